"""The paper's six downstream tasks, one self-contained file each."""
