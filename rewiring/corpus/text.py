"""What the embedded corpus says: a small sentence grammar, keywords, commands and requests.

Everything is lower-case letters and spaces, so character CTC (asr, sf) needs no text cleaning,
and every choice is drawn from a numpy Generator, so a seed fixes every sentence.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "IC_INTENTS",
    "KEYWORDS",
    "SF_INTENTS",
    "SILENCE",
    "UNKNOWN",
    "UNKNOWN_WORDS",
    "ic_command",
    "sentence",
    "sf_request",
    "vocabulary",
]

# ---------------------------------------------------------------- the sentence grammar (asr, sid, sd)

NOUNS = (
    "dog cat horse bird fox farmer teacher doctor girl boy king queen captain sailor soldier baker "
    "painter student neighbor friend mother father brother sister river mountain forest garden village "
    "city house window door table chair letter book story song ship boat train road bridge tower castle "
    "market field lake island valley stone tree flower apple cake lamp clock picture map wall basket key "
    "coin ring hat coat candle bottle wagon kettle pencil ladder blanket mirror engine pilot rabbit owl"
).split()
IRREGULAR_PLURALS = {"wolf": "wolves", "child": "children", "man": "men", "woman": "women", "mouse": "mice"}
NOUNS += list(IRREGULAR_PLURALS)
ADJECTIVES = (
    "old young small large quiet loud bright dark happy tired clever brave gentle cold warm green red "
    "blue yellow white black heavy empty strange tall narrow wide wooden golden busy lonely careful quick "
    "slow ancient distant little famous hungry silver proud friendly"
).split()
VERBS_TRANSITIVE = (
    "saw found carried painted opened closed watched followed visited built bought sold lost kept cleaned "
    "moved pulled pushed remembered liked wanted needed brought took made held left chased counted "
    "fixed hid washed borrowed dropped"
).split()
VERBS_INTRANSITIVE = (
    "slept waited laughed smiled walked ran sang danced arrived stayed rested listened worked returned "
    "jumped fell spoke shouted travelled whistled paused wandered"
).split()
PREPOSITIONS = "near behind under above beside inside across along past through towards around".split()
ADVERBS = (
    "quickly slowly quietly carefully suddenly gladly again often always today yesterday later soon".split()
)
NAMES = (
    "anna peter maria lucy david emma oliver sophie thomas clara henry julia martin nora simon alice "
    "victor rosa felix hannah"
).split()
NUMBERS = "two three four five six seven eight nine ten twelve twenty".split()
POSSESSIVES = "my your his her our their".split()
TIMES = (
    "in the morning",
    "at night",
    "on monday",
    "on friday",
    "after dinner",
    "before noon",
    "last winter",
    "every summer",
    "in the evening",
    "at dawn",
)
SAY_VERBS = "said thought believed knew heard".split()


def _plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("fe"):
        return noun[:-2] + "ves"
    return noun + "s"


def _pick(rng: np.random.Generator, words: list[str] | tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator, plural: bool = True) -> str:
    r = rng.random()
    if r < 0.15:
        return _pick(rng, NAMES)
    adj = f"{_pick(rng, ADJECTIVES)} " if rng.random() < 0.5 else ""
    if plural and r < 0.35:
        return f"{_pick(rng, NUMBERS)} {adj}{_plural(_pick(rng, NOUNS))}"
    det = _pick(rng, ("the", "the", "a", "this", "that", "every", *POSSESSIVES))
    noun = _pick(rng, NOUNS)
    if det == "a" and (adj or noun)[0] in "aeiou":
        det = "an"
    return f"{det} {adj}{noun}"


def _clause(rng: np.random.Generator) -> str:
    subject = _noun_phrase(rng)
    if rng.random() < 0.55:
        core = f"{subject} {_pick(rng, VERBS_TRANSITIVE)} {_noun_phrase(rng)}"
    else:
        core = f"{subject} {_pick(rng, VERBS_INTRANSITIVE)}"
    extras = []
    if rng.random() < 0.5:
        extras.append(f"{_pick(rng, PREPOSITIONS)} {_noun_phrase(rng)}")
    if rng.random() < 0.3:
        extras.append(_pick(rng, ADVERBS))
    if rng.random() < 0.2:
        extras.append(_pick(rng, TIMES))
    return " ".join([core, *extras])


def sentence(rng: np.random.Generator, max_words: int = 16) -> str:
    """One sentence of the grammar (about 3 to 16 words): a clause, a question or reported speech."""
    while True:
        r = rng.random()
        if r < 0.12:
            text = f"where is {_noun_phrase(rng, plural=False)}"
        elif r < 0.22:
            text = f"who {_pick(rng, VERBS_TRANSITIVE)} {_noun_phrase(rng)}"
        elif r < 0.32:
            text = f"{_pick(rng, NAMES)} {_pick(rng, SAY_VERBS)} that {_clause(rng)}"
        elif r < 0.40:
            text = f"{_clause(rng)} and {_clause(rng)}"
        else:
            text = _clause(rng)
        if 3 <= len(text.split()) <= max_words:
            return text


# ---------------------------------------------------------------- keyword spotting (Speech Commands v1)

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
# Speech Commands v1's twenty auxiliary words, which make up its _unknown_ class.
UNKNOWN_WORDS = (
    "bed",
    "bird",
    "cat",
    "dog",
    "eight",
    "five",
    "four",
    "happy",
    "house",
    "marvin",
    "nine",
    "one",
    "seven",
    "sheila",
    "six",
    "three",
    "tree",
    "two",
    "wow",
    "zero",
)

# ---------------------------------------------------------------- intent classification (Fluent Speech Commands)

_LOCATIONS = ("kitchen", "bedroom", "washroom")
_IC_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    # (action, object): phrasings; {loc} is "in the <location>" or left out for location "none"
    ("activate", "lights"): (
        "turn on the lights{loc}",
        "switch on the lights{loc}",
        "lights on{loc}",
        "switch the lights on{loc}",
    ),
    ("deactivate", "lights"): (
        "turn off the lights{loc}",
        "switch off the lights{loc}",
        "lights off{loc}",
        "turn the lights off{loc}",
    ),
    ("increase", "heat"): (
        "turn up the heat{loc}",
        "make it warmer{loc}",
        "increase the temperature{loc}",
        "heat up{loc}",
    ),
    ("decrease", "heat"): (
        "turn down the heat{loc}",
        "make it cooler{loc}",
        "decrease the temperature{loc}",
        "lower the heating{loc}",
    ),
    ("increase", "volume"): ("turn up the volume", "louder please", "increase the volume", "make it louder"),
    ("decrease", "volume"): (
        "turn down the volume",
        "quieter please",
        "decrease the volume",
        "make it quieter",
    ),
    ("activate", "music"): ("play the music", "start the music", "put some music on", "music on"),
    ("deactivate", "music"): ("stop the music", "pause the music", "turn the music off", "music off"),
    ("activate", "lamp"): ("turn on the lamp", "switch the lamp on", "lamp on"),
    ("deactivate", "lamp"): ("turn off the lamp", "switch the lamp off", "lamp off"),
    ("bring", "newspaper"): ("bring me the newspaper", "get me the newspaper", "fetch the newspaper"),
    ("bring", "juice"): ("bring me some juice", "get me a juice", "fetch some juice"),
    ("bring", "socks"): ("bring me my socks", "get my socks", "fetch my socks"),
    ("bring", "shoes"): ("bring me my shoes", "get my shoes", "fetch my shoes"),
    ("change_language", "chinese"): (
        "switch the language to chinese",
        "change the language to chinese",
        "use chinese",
    ),
    ("change_language", "korean"): (
        "switch the language to korean",
        "change the language to korean",
        "use korean",
    ),
    ("change_language", "english"): (
        "switch the language to english",
        "change the language to english",
        "use english",
    ),
    ("change_language", "german"): (
        "switch the language to german",
        "change the language to german",
        "use german",
    ),
    ("change_language", "none"): ("change the language", "switch the language", "language settings"),
}


def _ic_intents() -> list[tuple[str, str, str]]:
    out = []
    for (action, obj), phrases in _IC_PHRASES.items():
        has_loc = any("{loc}" in p for p in phrases)
        for loc in ("none", *_LOCATIONS) if has_loc else ("none",):
            out.append((action, obj, loc))
    return out


IC_INTENTS: tuple[tuple[str, str, str], ...] = tuple(_ic_intents())


def ic_command(rng: np.random.Generator, intent: tuple[str, str, str]) -> str:
    """A spoken command for (action, object, location), e.g. 'turn on the lights in the kitchen'."""
    action, obj, loc = intent
    phrase = _pick(rng, _IC_PHRASES[(action, obj)])
    return phrase.format(loc="" if loc == "none" else f" in the {loc}")


# ---------------------------------------------------------------- slot filling (Audio SNIPS)

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "city": (
        "london",
        "paris",
        "boston",
        "chicago",
        "denver",
        "madrid",
        "berlin",
        "dublin",
        "toronto",
        "sydney",
        "rome",
        "austin",
        "seattle",
        "lisbon",
    ),
    "country": ("france", "spain", "canada", "ireland", "italy", "japan", "norway", "brazil"),
    "timeRange": (
        "tomorrow",
        "tonight",
        "this weekend",
        "next week",
        "on monday",
        "at noon",
        "in the morning",
        "this evening",
    ),
    "condition_description": ("rain", "snow", "sunny", "cloudy", "windy", "foggy", "stormy"),
    "condition_temperature": ("hot", "cold", "warm", "freezing", "chilly"),
    "artist": (
        "anna blue",
        "the silver birds",
        "marco stone",
        "lucy gray",
        "the night owls",
        "david king",
        "nora lane",
    ),
    "service": ("spotify", "youtube", "deezer", "pandora", "itunes"),
    "genre": ("jazz", "rock", "blues", "pop", "folk", "classical", "country"),
    "music_item": ("song", "album", "track"),
    "playlist": ("road trip", "morning coffee", "chill evening", "workout", "study time", "summer hits"),
    "year": ("nineteen eighty", "nineteen ninety five", "two thousand ten", "the sixties", "the eighties"),
    "party_size_number": ("two", "three", "four", "five", "six", "eight", "ten"),
    "restaurant_type": ("restaurant", "bar", "cafe", "pub", "diner", "bistro"),
    "served_dish": ("pizza", "sushi", "pasta", "tacos", "curry", "noodles"),
    "object_type": ("book", "novel", "textbook", "saga", "poem"),
    "rating_value": ("one", "two", "three", "four", "five"),
    "best_rating": ("five", "six", "ten"),
    "object_name": (
        "the silent river",
        "a winter tale",
        "the golden key",
        "night of stars",
        "the last garden",
        "road to nowhere",
    ),
    "movie_name": ("the long voyage", "city of glass", "the red balloon", "blue horizon", "the iron giant"),
    "location_name": ("the grand cinema", "star theater", "city plaza cinema", "the royal cinema"),
    "spatial_relation": ("nearby", "close by", "in the area", "near me"),
}
_SF_TEMPLATES: dict[str, tuple[str, ...]] = {
    "AddToPlaylist": (
        "add {artist} to my {playlist} playlist",
        "put this {music_item} on {playlist}",
        "add this {music_item} by {artist} to {playlist}",
        "please add {artist} to {playlist}",
    ),
    "BookRestaurant": (
        "book a table for {party_size_number} at a {restaurant_type} in {city}",
        "reserve a {restaurant_type} for {party_size_number} people {timeRange}",
        "find me a {restaurant_type} that serves {served_dish} {spatial_relation}",
        "book a {restaurant_type} in {city} {timeRange}",
    ),
    "GetWeather": (
        "what will the weather be in {city} {timeRange}",
        "is it going to be {condition_description} in {city}",
        "will it be {condition_temperature} {timeRange} in {country}",
        "weather forecast for {country} {timeRange}",
    ),
    "PlayMusic": (
        "play {artist} on {service}",
        "play some {genre} music",
        "play a {music_item} by {artist}",
        "play {genre} from {year} on {service}",
    ),
    "RateBook": (
        "rate this {object_type} {rating_value} out of {best_rating}",
        "give {object_name} {rating_value} stars",
        "i would rate {object_name} {rating_value} points",
        "rate the {object_type} {object_name} {rating_value} out of {best_rating}",
    ),
    "SearchCreativeWork": (
        "find the {object_type} called {object_name}",
        "show me the {object_type} {object_name}",
        "search for {object_name}",
        "where can i find the {object_type} {object_name}",
    ),
    "SearchScreeningEvent": (
        "what movies are playing at {location_name} {timeRange}",
        "find the schedule for {movie_name} at {location_name}",
        "is {movie_name} playing {spatial_relation}",
        "when is {movie_name} showing {timeRange}",
    ),
}
SF_INTENTS: tuple[str, ...] = tuple(_SF_TEMPLATES)


def sf_request(rng: np.random.Generator, intent: str) -> tuple[str, list[list[str]]]:
    """A spoken request for `intent`: (text, slots in order of appearance), slot values verbatim."""
    words: list[str] = []
    slots: list[list[str]] = []
    for token in _pick(rng, _SF_TEMPLATES[intent]).split():
        if token.startswith("{"):
            slot = token[1:-1]
            value = _pick(rng, SLOT_VALUES[slot])
            slots.append([slot, value])
            words.append(value)
        else:
            words.append(token)
    return " ".join(words), slots


def vocabulary() -> set[str]:
    """Every word the grammar, the commands and the requests can say."""
    words: set[str] = set()
    for group in (
        NOUNS,
        ADJECTIVES,
        VERBS_TRANSITIVE,
        VERBS_INTRANSITIVE,
        PREPOSITIONS,
        ADVERBS,
        NAMES,
        NUMBERS,
        POSSESSIVES,
        SAY_VERBS,
        KEYWORDS,
        UNKNOWN_WORDS,
    ):
        words.update(group)
    words.update(_plural(n) for n in NOUNS)
    words.update("the a an this that every where is who and".split())
    for t in TIMES:
        words.update(t.split())
    for phrases in _IC_PHRASES.values():
        for p in phrases:
            words.update(p.replace("{loc}", " in the").split())
    words.update(_LOCATIONS)
    for templates in _SF_TEMPLATES.values():
        for t in templates:
            words.update(w for w in t.split() if not w.startswith("{"))
    for values in SLOT_VALUES.values():
        for v in values:
            words.update(v.split())
    return words
