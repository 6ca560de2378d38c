"""Write jft/assets/en_fr.jsonl: short English -> French sentences built from small word lists.

    python scripts/make_en_fr.py            # rewrites the asset; deterministic (fixed seed)

Every sentence is assembled from tables below with explicit French grammar: article choice and
elision (le/la/l'/les, du/de la/de l', de/d' after a negation), je -> j', ne -> n', que -> qu',
present-tense conjugation for all six persons, and adjective agreement in gender and number
(including vieux -> vieil before a vowel). English uses the simple present, or the
progressive for action verbs, with do-support in negations and questions.

Ambiguities are avoided rather than guessed: "you" is always "tu", "you all" is "vous", "they" is
"ils", and adjectives never describe je/tu/nous/vous (their gender is unknown).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "jft" / "assets" / "en_fr.jsonl"
INSTRUCTION = "Translate to French."
VOWELS = "aeiouéèêâîôœh"  # every h-word used here (homme) is a silent h

# ---------------------------------------------------------------------------- words


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    fr: str
    fr_pl: str
    gender: str  # "m" | "f"
    kind: str  # "human" | "animal" | "food" | "drink" | "thing"
    mass: bool = False  # uncountable: bread -> du pain
    small: bool = False  # fits under a table / on a bed
    adjs: tuple[str, ...] = ()  # attributive adjectives that make sense with it


# Attributive adjectives: English, French m.sg / f.sg / m.pl / f.pl, placed before the noun?,
# and the masculine singular form before a vowel (vieil homme).
ADJ = {
    "small": ("petit", "petite", "petits", "petites", True, None),
    "big": ("grand", "grande", "grands", "grandes", True, None),
    "old": ("vieux", "vieille", "vieux", "vieilles", True, "vieil"),
    "young": ("jeune", "jeune", "jeunes", "jeunes", True, None),
    "black": ("noir", "noire", "noirs", "noires", False, None),
    "white": ("blanc", "blanche", "blancs", "blanches", False, None),
    "red": ("rouge", "rouge", "rouges", "rouges", False, None),
    "green": ("vert", "verte", "verts", "vertes", False, None),
    "blue": ("bleu", "bleue", "bleus", "bleues", False, None),
}
# Predicate adjectives (X is tired) add three that are not used attributively.
PRED_ADJ = {
    **{k: v[:4] for k, v in ADJ.items()},
    "tired": ("fatigué", "fatiguée", "fatigués", "fatiguées"),
    "happy": ("content", "contente", "contents", "contentes"),
    "sad": ("triste", "triste", "tristes", "tristes"),
}
PEOPLE_ADJ = ("old", "young")  # no "big": "un grand homme" is "a great man"
ANIMAL_ADJ = ("small", "big", "old", "young", "black", "white")

NOUNS = [
    Noun("cat", "cats", "chat", "chats", "m", "animal", small=True, adjs=ANIMAL_ADJ),
    Noun("dog", "dogs", "chien", "chiens", "m", "animal", small=True, adjs=ANIMAL_ADJ),
    Noun("horse", "horses", "cheval", "chevaux", "m", "animal", adjs=ANIMAL_ADJ),
    Noun("bird", "birds", "oiseau", "oiseaux", "m", "animal", small=True, adjs=("small", "black", "white", "blue")),
    Noun("mouse", "mice", "souris", "souris", "f", "animal", small=True, adjs=("small", "white")),
    Noun("boy", "boys", "garçon", "garçons", "m", "human", adjs=("small", "big")),
    Noun("girl", "girls", "fille", "filles", "f", "human", adjs=("small", "big")),
    Noun("man", "men", "homme", "hommes", "m", "human", adjs=PEOPLE_ADJ),
    Noun("woman", "women", "femme", "femmes", "f", "human", adjs=PEOPLE_ADJ),
    Noun("mother", "mothers", "mère", "mères", "f", "human"),
    Noun("father", "fathers", "père", "pères", "m", "human"),
    Noun("brother", "brothers", "frère", "frères", "m", "human", adjs=("small", "big")),
    Noun("sister", "sisters", "sœur", "sœurs", "f", "human", adjs=("small", "big")),
    Noun("apple", "apples", "pomme", "pommes", "f", "food", small=True, adjs=("small", "red", "green")),
    Noun("cake", "cakes", "gâteau", "gâteaux", "m", "food", small=True, adjs=("small",)),
    Noun("orange", "oranges", "orange", "oranges", "f", "food", small=True),
    Noun("egg", "eggs", "œuf", "œufs", "m", "food", small=True, adjs=("small", "white")),
    Noun("bread", "", "pain", "", "m", "food", mass=True, small=True),
    Noun("cheese", "", "fromage", "", "m", "food", mass=True, small=True),
    Noun("soup", "", "soupe", "", "f", "food", mass=True),
    Noun("water", "", "eau", "", "f", "drink", mass=True),
    Noun("milk", "", "lait", "", "m", "drink", mass=True),
    Noun("tea", "", "thé", "", "m", "drink", mass=True),
    Noun("book", "books", "livre", "livres", "m", "thing", small=True, adjs=("small", "big", "old", "red", "blue")),
    Noun("letter", "letters", "lettre", "lettres", "f", "thing", small=True, adjs=("small",)),
    Noun("car", "cars", "voiture", "voitures", "f", "thing", adjs=("small", "big", "old", "red", "blue", "black")),
    Noun("house", "houses", "maison", "maisons", "f", "thing", adjs=("small", "big", "old", "white")),
    Noun("door", "doors", "porte", "portes", "f", "thing", adjs=("red", "blue", "green", "white")),
    Noun("box", "boxes", "boîte", "boîtes", "f", "thing", small=True, adjs=("small", "big", "red", "blue")),
    Noun("key", "keys", "clé", "clés", "f", "thing", small=True, adjs=("small",)),
    Noun("flower", "flowers", "fleur", "fleurs", "f", "thing", small=True, adjs=("red", "white", "blue")),
]
NUMBERS = {"two": "deux", "three": "trois", "four": "quatre", "five": "cinq"}


@dataclass(frozen=True)
class Verb:
    en: str  # base form
    en_s: str  # third person singular
    en_ing: str | None  # None: stative, simple present only
    fr: tuple[str, ...]  # je, tu, il/elle, nous, vous, ils/elles
    who: tuple[str, ...]  # subject kinds
    objects: tuple[str, ...] = ()  # object kinds (or noun names); empty: intransitive
    generic: bool = False  # aimer: a bare English object takes the definite article in French


INTRANSITIVE = [
    Verb("sleep", "sleeps", "sleeping", ("dors", "dors", "dort", "dormons", "dormez", "dorment"), ("human", "animal")),
    Verb("run", "runs", "running", ("cours", "cours", "court", "courons", "courez", "courent"), ("human", "animal")),
    Verb(
        "sing",
        "sings",
        "singing",
        ("chante", "chantes", "chante", "chantons", "chantez", "chantent"),
        ("human", "bird"),
    ),
    Verb("dance", "dances", "dancing", ("danse", "danses", "danse", "dansons", "dansez", "dansent"), ("human",)),
    Verb("swim", "swims", "swimming", ("nage", "nages", "nage", "nageons", "nagez", "nagent"), ("human", "dog")),
    Verb(
        "walk",
        "walks",
        "walking",
        ("marche", "marches", "marche", "marchons", "marchez", "marchent"),
        ("human", "animal"),
    ),
    Verb("play", "plays", "playing", ("joue", "joues", "joue", "jouons", "jouez", "jouent"), ("human", "animal")),
]
TRANSITIVE = [
    Verb(
        "eat",
        "eats",
        "eating",
        ("mange", "manges", "mange", "mangeons", "mangez", "mangent"),
        ("human", "animal"),
        ("food",),
    ),
    Verb("drink", "drinks", "drinking", ("bois", "bois", "boit", "buvons", "buvez", "boivent"), ("human",), ("drink",)),
    Verb(
        "see",
        "sees",
        None,
        ("vois", "vois", "voit", "voyons", "voyez", "voient"),
        ("human", "animal"),
        ("human", "animal", "thing"),
    ),
    Verb(
        "read", "reads", "reading", ("lis", "lis", "lit", "lisons", "lisez", "lisent"), ("human",), ("book", "letter")
    ),
    Verb(
        "like",
        "likes",
        None,
        ("aime", "aimes", "aime", "aimons", "aimez", "aiment"),
        ("human", "animal"),
        ("food", "drink", "human", "animal", "book", "flower"),
        generic=True,
    ),
    Verb(
        "want",
        "wants",
        None,
        ("veux", "veux", "veut", "voulons", "voulez", "veulent"),
        ("human",),
        ("food", "drink", "book", "car", "house", "flower", "cat", "dog"),
    ),
    Verb(
        "buy",
        "buys",
        "buying",
        ("achète", "achètes", "achète", "achetons", "achetez", "achètent"),
        ("human",),
        ("food", "drink", "book", "car", "house", "flower", "key"),
    ),
    Verb(
        "have",
        "has",
        None,
        ("ai", "as", "a", "avons", "avez", "ont"),
        ("human",),
        ("cat", "dog", "horse", "bird", "car", "house", "book", "key", "brother", "sister"),
    ),
    Verb(
        "look for",
        "looks for",
        "looking for",
        ("cherche", "cherches", "cherche", "cherchons", "cherchez", "cherchent"),
        ("human", "animal"),
        ("human", "animal", "key", "book", "box"),
    ),
]
BE = ("suis", "es", "est", "sommes", "êtes", "sont")
HAVE = ("ai", "as", "a", "avons", "avez", "ont")
EN_BE = ("am", "are", "is", "are", "are", "are")
EN_DO = ("do", "do", "does", "do", "do", "do")

# Pronoun subjects: English, French, person index (0-5), gender for agreement (None: unknown).
PRONOUNS = [
    ("I", "je", 0, None),
    ("you", "tu", 1, None),
    ("he", "il", 2, "m"),
    ("she", "elle", 2, "f"),
    ("we", "nous", 3, None),
    ("you all", "vous", 4, None),
    ("they", "ils", 5, "m"),
]

# Places: English, French, who may be there ("small" = small animals and small things).
PLACES = [
    ("in the garden", "dans le jardin", {"human", "animal", "flower"}),
    ("in the house", "dans la maison", {"human", "small"}),
    ("in the kitchen", "dans la cuisine", {"human", "small", "food", "drink"}),
    ("in the park", "dans le parc", {"human", "animal"}),
    ("at school", "à l'école", {"child"}),
    ("at the beach", "à la plage", {"human", "dog"}),
    ("at home", "à la maison", {"human"}),
    ("on the table", "sur la table", {"small_thing", "cat"}),
    ("under the table", "sous la table", {"small"}),
    ("on the bed", "sur le lit", {"small", "human"}),
    ("under the bed", "sous le lit", {"small"}),
    ("in the box", "dans la boîte", {"mouse", "key", "letter", "egg", "apple", "orange", "cake"}),
    ("in the tree", "dans l'arbre", {"bird", "cat"}),
    ("under the tree", "sous l'arbre", {"human", "animal"}),
    ("in the car", "dans la voiture", {"human", "dog"}),
]
# Where each intransitive action happens.
VERB_PLACES = {
    "sleep": ("in the garden", "in the house", "on the bed", "under the table", "under the tree", "in the car"),
    "run": ("in the garden", "in the park", "at the beach"),
    "sing": ("in the garden", "in the house", "in the kitchen", "at school", "in the tree", "in the car"),
    "dance": ("in the garden", "in the house", "in the kitchen", "at school", "at the beach"),
    "swim": ("at the beach",),
    "walk": ("in the garden", "in the park", "at the beach"),
    "play": ("in the garden", "in the park", "in the house", "at school", "at the beach", "under the table"),
}
# Manner adverbs and the verbs they suit; time adverbs (text, suits simple present, suits progressive).
MANNER = {
    "well": ("bien", ("sleep", "sing", "dance", "swim", "play")),
    "quickly": ("vite", ("run", "walk", "swim")),
    "slowly": ("lentement", ("walk", "run", "swim")),
    "a lot": ("beaucoup", ("sleep", "play", "dance", "sing")),
}
TIME = [
    ("today", "aujourd'hui", True, True),
    ("now", "maintenant", False, True),
    ("every day", "tous les jours", True, False),
    ("in the morning", "le matin", True, False),
    ("in the evening", "le soir", True, False),
]
CHILDREN = {"boy", "girl"}
PETS = {"cat", "dog", "bird", "horse"}
DEFINITE = ("the", "the_pl", "my", "my_pl")


def determiners(noun: Noun) -> list[str]:
    """Determiners that read naturally with ``noun`` ("bare": a plural or mass noun alone)."""
    if noun.mass:
        return ["the", "bare", "bare"]
    if noun.en in ("mother", "father"):
        return ["the", "my"]
    if noun.en in ("brother", "sister"):
        return ["my", "my_pl", "a", "two"]
    dets = ["the", "the", "the_pl", "the_pl", "a", "a", "two", "three", "bare"]
    if noun.en in PETS or noun.kind == "thing":
        dets += ["my", "my_pl"]
    return dets


# ---------------------------------------------------------------------------- grammar


def starts_vowel(word: str) -> bool:
    return word[0].lower() in VOWELS


def elide(word: str, nxt: str) -> str:
    """le/la/je/ne/que/de -> l'/j'/n'/qu'/d' before a vowel; returns the joined pair."""
    if word in ("le", "la", "je", "ne", "que", "de") and starts_vowel(nxt):
        return word[:-1] + "'" + nxt
    return word + " " + nxt


def en_article(nxt: str) -> str:
    return "an" if nxt[0] in "aeiou" else "a"


@dataclass(frozen=True)
class NP:
    """A noun phrase in both languages with what agreement and elision need."""

    en: str
    fr_det: str  # determiner before fr_rest ("" for none); elided against it when joined
    fr_rest: str
    person: int  # 2 singular, 5 plural (pronouns set their own)
    gender: str | None
    noun: Noun | None
    plural: bool

    @property
    def fr(self) -> str:
        return elide(self.fr_det, self.fr_rest) if self.fr_det else self.fr_rest


def fr_noun_with_adj(noun: Noun, plural: bool, adj: str | None) -> str:
    """``petit chien``, ``chats noirs``, ``vieil homme``: the noun and its agreeing adjective."""
    word = noun.fr_pl if plural else noun.fr
    if adj is None:
        return word
    ms, fs, mp, fp, before, ms_vowel = ADJ[adj]
    form = {("m", False): ms, ("f", False): fs, ("m", True): mp, ("f", True): fp}[(noun.gender, plural)]
    if before:
        if ms_vowel and noun.gender == "m" and not plural and starts_vowel(word):
            form = ms_vowel
        return f"{form} {word}"
    return f"{word} {form}"


def noun_phrase(noun: Noun, det: str, adj: str | None = None, negated: bool = False, generic: bool = False) -> NP:
    """det: "the", "a", "my", "bare" (plural or mass, no article), or a number word."""
    plural = det == "bare" and not noun.mass or det in NUMBERS or det == "the_pl" or det == "my_pl"
    en_word = noun.en_pl if plural else noun.en
    en_body = f"{adj} {en_word}" if adj else en_word
    fr_body = fr_noun_with_adj(noun, plural, adj)
    g = noun.gender
    if det in ("the", "the_pl"):
        en, fr_det = f"the {en_body}", "les" if plural else ("le" if g == "m" else "la")
    elif det in ("my", "my_pl"):
        en = f"my {en_body}"
        fr_det = "mes" if plural else ("mon" if g == "m" or starts_vowel(fr_body) else "ma")
    elif det == "a":
        en = f"{en_article(en_body)} {en_body}"
        fr_det = "de" if negated else ("un" if g == "m" else "une")
    elif det in NUMBERS:
        en, fr_det = f"{det} {en_body}", NUMBERS[det]
    elif det == "bare":
        en = en_body
        if generic:  # I like apples -> J'aime les pommes
            fr_det = "les" if plural else ("le" if g == "m" else "la")
        elif negated:
            fr_det = "de"
        elif plural:
            fr_det = "des"
        else:
            fr_det = "du" if g == "m" else "de la"
            if starts_vowel(fr_body):
                fr_det = "de l'"
    else:
        raise ValueError(det)
    if fr_det == "de l'":
        return NP(en, "", "de l'" + fr_body, 5 if plural else 2, g, noun, plural)
    return NP(en, fr_det, fr_body, 5 if plural else 2, g, noun, plural)


def pronoun(i: int) -> NP:
    en, fr, person, gender = PRONOUNS[i]
    return NP(en, "", fr, person, gender, None, person in (3, 4, 5))


def fits(noun: Noun, who: tuple[str, ...] | set[str]) -> bool:
    return (
        noun.kind in who
        or noun.en in who
        or (noun.small and "small" in who and noun.kind in ("animal", "thing"))
        or (noun.small and "small_thing" in who and noun.kind in ("thing", "food"))
        or (noun.en in CHILDREN and "child" in who)
    )


def subject_fits(subj: NP, who) -> bool:
    return fits(subj.noun, who) if subj.noun else "human" in who


def sentence(words: str, question: bool = False, french: bool = False) -> str:
    text = words[0].upper() + words[1:]
    if not question:
        return text + "."
    return text + (" ?" if french else "?")


def en_verb_phrase(subj: NP, verb: Verb, progressive: bool, negated: bool, question: bool) -> tuple[str, str]:
    """(English before the subject, English after it): "", "is sleeping" or "does", "not sleep"."""
    p = subj.person
    if progressive:
        aux = EN_BE[p]
        if question:
            return aux, verb.en_ing
        return "", f"{aux} {'not ' if negated else ''}{verb.en_ing}"
    if question:
        return EN_DO[p], verb.en
    if negated:
        return "", f"{EN_DO[p]} not {verb.en}"
    return "", verb.en_s if p == 2 else verb.en


def en_clause(subj: NP, verb: Verb, rest: str, progressive: bool, negated: bool, question: bool) -> str:
    before, after = en_verb_phrase(subj, verb, progressive, negated, question)
    words = [before, subj.en, after, rest] if question else [subj.en, after, rest]
    return " ".join(w for w in words if w)


def fr_clause(subj: NP, form: str, rest: str, negated: bool, question: bool) -> str:
    """``le chat ne dort pas``, ``est-ce qu'il mange du pain``: subject, verb, rest."""
    if negated:
        verb = elide("ne", form) + " pas"
    else:
        verb = form
    if subj.fr_det == "" and subj.fr_rest == "je":
        clause = elide("je", verb)
    else:
        clause = f"{subj.fr} {verb}"
    clause = f"{clause} {rest}".strip()
    if question:
        clause = "est-ce " + elide("que", clause)
    return clause


def en_be(subj: NP, negated: bool, question: bool, rest: str) -> str:
    be = EN_BE[subj.person]
    if question:
        return f"{be} {subj.en} {rest}"
    return f"{subj.en} {be}{' not' if negated else ''} {rest}"


# ---------------------------------------------------------------------------- families


def subjects(rng: random.Random, who, allow_adj: bool = True) -> NP:
    """A random subject that may perform an action for ``who``: a pronoun or a noun phrase."""
    while True:
        if rng.random() < 0.35:
            subj = pronoun(rng.randrange(len(PRONOUNS)))
        else:
            noun = rng.choice([n for n in NOUNS if n.kind in ("human", "animal")])
            det = rng.choice([d for d in determiners(noun) if d != "bare"])  # bare subjects are generic
            adj = rng.choice(noun.adjs) if allow_adj and noun.adjs and rng.random() < 0.35 else None
            subj = noun_phrase(noun, det, adj)
        if subject_fits(subj, who):
            return subj


def object_np(rng: random.Random, verb: Verb, negated: bool) -> NP | None:
    candidates = [n for n in NOUNS if fits(n, verb.objects)]
    noun = rng.choice(candidates)
    dets = determiners(noun)
    if verb.generic:  # "I like a cake" is odd; "I like cakes" is generic
        dets = [d for d in dets if d not in ("a",) and d not in NUMBERS] or dets
    if verb.en == "have":  # "I have the dog" needs context
        dets = [d for d in dets if d not in ("the", "the_pl")]
    det = rng.choice(dets)
    if negated and det in NUMBERS:
        return None  # "does not have two dogs" needs context
    adj = None
    if noun.adjs and rng.random() < 0.35:
        adj = rng.choice(noun.adjs)
        if ADJ[adj][4] and det == "bare":  # des + adjective before the noun -> "de": avoided
            adj = None
    return noun_phrase(noun, det, adj, negated=negated, generic=verb.generic)


def polarity(rng: random.Random, subj: NP) -> tuple[bool, bool]:
    """(negated, question); only statements for "a dog" / "two dogs", no questions about "I"."""
    r = rng.random()
    negated, question = r < 0.15, 0.15 <= r < 0.27
    if subj.fr_det in ("un", "une", *NUMBERS.values()):
        return False, False
    return negated, question and subj.en != "I"


def intransitive(rng: random.Random):
    verb = rng.choice(INTRANSITIVE)
    subj = subjects(rng, verb.who)
    negated, question = polarity(rng, subj)
    progressive = rng.random() < 0.5
    en_rest = fr_rest = ""
    r = rng.random()
    manners = [m for m, (_, verbs) in MANNER.items() if verb.en in verbs]
    places = [p for p in PLACES if p[0] in VERB_PLACES[verb.en] and subject_fits(subj, p[2])]
    if r < 0.3 and manners and not progressive:
        m = rng.choice(manners)
        en_rest, fr_rest = m, MANNER[m][0]
    elif r < 0.65 and places:
        en_rest, fr_rest, _ = rng.choice(places)
    elif r < 0.85:
        times = [t for t in TIME if (t[3] if progressive else t[2])]
        t = rng.choice(times)
        en_rest, fr_rest = t[0], t[1]
    en = en_clause(subj, verb, en_rest, progressive, negated, question)
    fr = fr_clause(subj, verb.fr[subj.person], fr_rest, negated, question)
    return sentence(en, question), sentence(fr, question, french=True)


def transitive(rng: random.Random):
    verb = rng.choice(TRANSITIVE)
    subj = subjects(rng, verb.who)
    negated, question = polarity(rng, subj)
    obj = object_np(rng, verb, negated and not verb.generic)
    if obj is None or obj.noun is subj.noun:  # "the girls look for the girls": pointless
        return None
    progressive = verb.en_ing is not None and rng.random() < 0.5
    en_rest, fr_rest = obj.en, obj.fr
    if verb.en not in ("have", "like", "want") and rng.random() < 0.25:  # "I have a key today": odd
        times = [t for t in TIME if (t[3] if progressive else t[2])]
        t = rng.choice(times)
        en_rest, fr_rest = f"{en_rest} {t[0]}", f"{fr_rest} {t[1]}"
    en = en_clause(subj, verb, en_rest, progressive, negated, question)
    fr = fr_clause(subj, verb.fr[subj.person], fr_rest, negated, question)
    return sentence(en, question), sentence(fr, question, french=True)


def be_adjective(rng: random.Random):
    """The girls are tired. -> Les filles sont fatiguées. (never je/tu/nous/vous)"""
    if rng.random() < 0.3:
        subj = pronoun(rng.choice([2, 3, 6]))
        adjs = ["small", "big", "old", "young", "tired", "happy", "sad"]
    else:
        noun = rng.choice([n for n in NOUNS if n.kind in ("human", "animal", "thing") and n.en != "key"])
        subj = noun_phrase(noun, rng.choice([d for d in determiners(noun) if d in DEFINITE]))
        if noun.kind == "thing":
            adjs = [a for a in noun.adjs]
        else:
            adjs = ["small", "big", "old", "young", "tired", "happy"] + (["sad"] if noun.kind == "human" else [])
            adjs += [a for a in noun.adjs if a in ("black", "white")]
        if not adjs:
            return None
    adj = rng.choice(adjs)
    negated, question = polarity(rng, subj)
    ms, fs, mp, fp = PRED_ADJ[adj]
    form = {("m", False): ms, ("f", False): fs, ("m", True): mp, ("f", True): fp}[(subj.gender, subj.plural)]
    en = en_be(subj, negated, question, adj)
    fr = fr_clause(subj, BE[subj.person], form, negated, question)
    return sentence(en, question), sentence(fr, question, french=True)


def be_place(rng: random.Random):
    """The cat is under the table. / Where are the girls? -> Où sont les filles ?"""
    noun = rng.choice([n for n in NOUNS if n.kind in ("human", "animal") or n.small])
    det = rng.choice([d for d in determiners(noun) if d in DEFINITE])
    subj = noun_phrase(noun, det)
    if rng.random() < 0.2:
        en = f"where {EN_BE[subj.person]} {subj.en}"
        fr = f"où {BE[subj.person]} {subj.fr}"
        return sentence(en, True), sentence(fr, True, french=True)
    places = [p for p in PLACES if fits(noun, p[2])]
    if not places:
        return None
    en_place, fr_place, _ = rng.choice(places)
    negated, question = polarity(rng, subj)
    en = en_be(subj, negated, question, en_place)
    fr = fr_clause(subj, BE[subj.person], fr_place, negated, question)
    return sentence(en, question), sentence(fr, question, french=True)


def hungry(rng: random.Random):
    """I am hungry. -> J'ai faim. (English be + adjective, French avoir + noun)"""
    feeling, noun = rng.choice([("hungry", "faim"), ("thirsty", "soif"), ("cold", "froid"), ("hot", "chaud")])
    subj = subjects(rng, ("human", "animal"), allow_adj=False)
    negated, question = polarity(rng, subj)
    en = en_be(subj, negated, question, feeling)
    fr = fr_clause(subj, HAVE[subj.person], noun, negated, question)
    return sentence(en, question), sentence(fr, question, french=True)


def there_is(rng: random.Random):
    """There are two dogs in the garden. -> Il y a deux chiens dans le jardin."""
    en_place, fr_place, who = rng.choice(PLACES)
    nouns = [n for n in NOUNS if fits(n, who) and n.kind != "human"]
    if not nouns:
        return None
    noun = rng.choice(nouns)
    negated = rng.random() < 0.2
    det = "bare" if noun.mass else rng.choice(["a", "a", "bare", "two", "three", "four", "five"])
    if negated and det in NUMBERS:
        det = "a"
    adj = rng.choice(noun.adjs) if noun.adjs and rng.random() < 0.3 else None
    if adj and ADJ[adj][4] and det == "bare":
        adj = None
    obj = noun_phrase(noun, det, adj, negated=negated)
    if negated:
        en_obj = obj.en[obj.en.index(" ") + 1 :] if det == "a" else obj.en
        en = f"there is no {en_obj} {en_place}" if not obj.plural else f"there are no {en_obj} {en_place}"
        fr = f"il n'y a pas {obj.fr} {fr_place}"
    else:
        en = f"there {'are' if obj.plural else 'is'} {obj.en} {en_place}"
        fr = f"il y a {obj.fr} {fr_place}"
    return sentence(en), sentence(fr, french=True)


FAMILIES = [(intransitive, 300), (transitive, 340), (be_adjective, 110), (be_place, 90), (hungry, 50), (there_is, 70)]


def main() -> None:
    rng = random.Random(SEED)
    records, seen_en = [], {}
    for family, target in FAMILIES:
        made, tries = 0, 0
        while made < target and tries < 50 * target:
            tries += 1
            pair = family(rng)
            if pair is None:
                continue
            en, fr = pair
            if not 3 <= len(en.rstrip(".?").split()) <= 8:
                continue
            if en in seen_en:
                assert seen_en[en] == fr, (en, seen_en[en], fr)
                continue
            seen_en[en] = fr
            records.append({"instruction": INSTRUCTION, "input": en, "output": fr})
            made += 1
    rng.shuffle(records)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    en_words = {w.lower() for r in records for w in r["input"].rstrip(".?").split()}
    fr_words = {w.lower() for r in records for w in r["output"].rstrip(".?").replace("'", "' ").split()}
    print(f"{len(records)} records -> {OUT}; {len(en_words)} English and {len(fr_words)} French words")


if __name__ == "__main__":
    main()
