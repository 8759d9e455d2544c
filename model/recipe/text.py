"""Text for the recipe: normalisation, an English-Spanish grammar, and offline English prose.

Design decisions:

- One normal form for every target: lowercase, digits spelled out, no punctuation
  except the apostrophe inside words; Spanish keeps its accents and drops the
  inverted marks. Short sentences (3-12 words) so that a tiny model can learn them.
- The grammar gives EXACT translations (agreement of gender and number, present
  tense conjugation), so translation targets are clean.
- Natural prose comes from Debian's ``fortunes`` files (sentences of 3-12 plain
  words), translated offline by apertium en-es when it is installed.
- Everything is a pure function of a ``random.Random`` seeded by the caller.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        head = number_words(n // 1000) + " thousand"
        return head + ("" if rest == 0 else " " + number_words(rest))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize(text: str) -> str:
    """Lowercase, digits spelled out, punctuation dropped (apostrophes inside words kept)."""
    text = unicodedata.normalize("NFC", text).lower()
    text = text.replace("’", "'").replace("‘", "'")
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[^\w' ]+", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    text = text.replace("_", " ")
    return " ".join(text.split())


# --- the grammar ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    es: str
    es_pl: str
    fem: bool


@dataclass(frozen=True)
class Adj:
    en: str
    ms: str  # masculine singular
    fs: str
    mp: str
    fp: str


def _n(en: str, es: str, fem: bool, en_pl: str | None = None, es_pl: str | None = None) -> Noun:
    if es_pl is None:
        es_pl = es + ("s" if es[-1] in "aeiouáéó" else "es")
    return Noun(en, en_pl or en + "s", es, es_pl, fem)


NOUNS: tuple[Noun, ...] = (
    _n("dog", "perro", False),
    _n("cat", "gato", False),
    _n("house", "casa", True),
    _n("car", "coche", False),
    _n("book", "libro", False),
    _n("table", "mesa", True),
    _n("chair", "silla", True),
    _n("door", "puerta", True),
    _n("window", "ventana", True),
    _n("apple", "manzana", True),
    _n("bird", "pájaro", False),
    _n("tree", "árbol", False, es_pl="árboles"),
    _n("flower", "flor", True, es_pl="flores"),
    _n("boy", "niño", False),
    _n("girl", "niña", True),
    _n("man", "hombre", False, en_pl="men"),
    _n("woman", "mujer", True, en_pl="women", es_pl="mujeres"),
    _n("friend", "amigo", False),
    _n("teacher", "profesor", False, es_pl="profesores"),
    _n("letter", "carta", True),
    _n("bottle", "botella", True),
    _n("cup", "taza", True),
    _n("phone", "teléfono", False),
    _n("key", "llave", True),
    _n("shoe", "zapato", False),
    _n("shirt", "camisa", True),
    _n("horse", "caballo", False),
    _n("fish", "pez", False, en_pl="fish", es_pl="peces"),
    _n("bread", "pan", False, es_pl="panes"),
    _n("city", "ciudad", True, en_pl="cities", es_pl="ciudades"),
    _n("street", "calle", True),
    _n("box", "caja", True, en_pl="boxes"),
    _n("picture", "foto", True),
    _n("computer", "ordenador", False, es_pl="ordenadores"),
    _n("song", "canción", True, es_pl="canciones"),
    _n("train", "tren", False, es_pl="trenes"),
    _n("ball", "pelota", True),
    _n("hat", "sombrero", False),
    _n("bag", "bolsa", True),
    _n("child", "niño", False, en_pl="children"),
)


def _a(en: str, ms: str, fs: str | None = None, pl: str | None = None) -> Adj:
    fs = fs if fs is not None else (ms[:-1] + "a" if ms.endswith("o") else ms)
    mp = pl if pl is not None else ms + ("s" if ms[-1] in "aeiou" else "es")
    fp = fs + ("s" if fs[-1] in "aeiou" else "es") if pl is None else pl
    return Adj(en, ms, fs, mp, fp)


ADJS: tuple[Adj, ...] = (
    _a("red", "rojo"),
    _a("blue", "azul", pl="azules"),
    _a("green", "verde"),
    _a("yellow", "amarillo"),
    _a("black", "negro"),
    _a("white", "blanco"),
    _a("big", "grande"),
    _a("small", "pequeño"),
    _a("new", "nuevo"),
    _a("old", "viejo"),
    _a("good", "bueno"),
    _a("beautiful", "bonito"),
    _a("happy", "feliz", pl="felices"),
    _a("cold", "frío"),
    _a("long", "largo"),
    _a("young", "joven", pl="jóvenes"),
)

# subject: (english, person index 0..5 = yo tu el nosotros vosotros ellos, spanish or "")
SUBJECTS: tuple[tuple[str, int, str], ...] = (
    ("i", 0, ""),
    ("you", 1, ""),
    ("he", 2, "él"),
    ("she", 2, "ella"),
    ("we", 3, ""),
    ("they", 5, "ellos"),
    ("my friend", 2, "mi amigo"),
    ("my mother", 2, "mi madre"),
    ("the teacher", 2, "el profesor"),
    ("the children", 5, "los niños"),
)

# verb: (english base, english 3rd singular, spanish forms yo/tu/el/nos/vos/ellos)
VERBS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("see", "sees", ("veo", "ves", "ve", "vemos", "veis", "ven")),
    ("want", "wants", ("quiero", "quieres", "quiere", "queremos", "queréis", "quieren")),
    ("have", "has", ("tengo", "tienes", "tiene", "tenemos", "tenéis", "tienen")),
    ("buy", "buys", ("compro", "compras", "compra", "compramos", "compráis", "compran")),
    (
        "need",
        "needs",
        ("necesito", "necesitas", "necesita", "necesitamos", "necesitáis", "necesitan"),
    ),
    (
        "find",
        "finds",
        ("encuentro", "encuentras", "encuentra", "encontramos", "encontráis", "encuentran"),
    ),
    ("open", "opens", ("abro", "abres", "abre", "abrimos", "abrís", "abren")),
    ("bring", "brings", ("traigo", "traes", "trae", "traemos", "traéis", "traen")),
    ("look for", "looks for", ("busco", "buscas", "busca", "buscamos", "buscáis", "buscan")),
    ("sell", "sells", ("vendo", "vendes", "vende", "vendemos", "vendéis", "venden")),
    ("clean", "cleans", ("limpio", "limpias", "limpia", "limpiamos", "limpiáis", "limpian")),
    ("paint", "paints", ("pinto", "pintas", "pinta", "pintamos", "pintáis", "pintan")),
)

# intransitive: (english base, 3rd singular, spanish forms)
INTRANS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("work", "works", ("trabajo", "trabajas", "trabaja", "trabajamos", "trabajáis", "trabajan")),
    ("sleep", "sleeps", ("duermo", "duermes", "duerme", "dormimos", "dormís", "duermen")),
    ("eat", "eats", ("como", "comes", "come", "comemos", "coméis", "comen")),
    ("run", "runs", ("corro", "corres", "corre", "corremos", "corréis", "corren")),
    ("read", "reads", ("leo", "lees", "lee", "leemos", "leéis", "leen")),
    ("sing", "sings", ("canto", "cantas", "canta", "cantamos", "cantáis", "cantan")),
    ("live", "lives", ("vivo", "vives", "vive", "vivimos", "vivís", "viven")),
    ("study", "studies", ("estudio", "estudias", "estudia", "estudiamos", "estudiáis", "estudian")),
)

PLACES: tuple[tuple[str, str], ...] = (
    ("at home", "en casa"),
    ("in the kitchen", "en la cocina"),
    ("in the garden", "en el jardín"),
    ("in the park", "en el parque"),
    ("at school", "en la escuela"),
    ("in the street", "en la calle"),
    ("on the table", "en la mesa"),
    ("in the car", "en el coche"),
    ("at the market", "en el mercado"),
    ("in the city", "en la ciudad"),
)

TIMES: tuple[tuple[str, str], ...] = (
    ("today", "hoy"),
    ("tomorrow", "mañana"),
    ("now", "ahora"),
    ("every day", "cada día"),
    ("in the morning", "por la mañana"),
    ("at night", "por la noche"),
    ("on monday", "el lunes"),
    ("on sunday", "el domingo"),
)

NUMS_ES = {2: "dos", 3: "tres", 4: "cuatro", 5: "cinco", 6: "seis", 7: "siete", 8: "ocho"}
_BE = {
    0: ("am", "estoy"),
    1: ("are", "estás"),
    2: ("is", "está"),
    3: ("are", "estamos"),
    5: ("are", "están"),
}


def _noun_phrase(rng: random.Random, allow_number: bool = True) -> tuple[str, str, bool]:
    """(english, spanish, plural) of a determiner + optional adjective + noun."""
    n = rng.choice(NOUNS)
    adj = rng.choice(ADJS) if rng.random() < 0.6 else None
    kind = rng.choice(["the", "a", "my", "num"] if allow_number else ["the", "a", "my"])
    plural = kind == "num" or (kind in ("the", "my") and rng.random() < 0.3)
    if kind == "num":
        k = rng.randint(2, 8)
        det_en, det_es = number_words(k), NUMS_ES[k]
    elif kind == "the":
        det_en = "the"
        det_es = ("las" if n.fem else "los") if plural else ("la" if n.fem else "el")
    elif kind == "a":
        det_en = "an" if (adj.en if adj else n.en)[0] in "aeiou" else "a"
        det_es = "una" if n.fem else "un"
    else:
        det_en, det_es = "my", "mis" if plural else "mi"
    noun_en = n.en_pl if plural else n.en
    noun_es = n.es_pl if plural else n.es
    en = f"{det_en} {adj.en + ' ' if adj else ''}{noun_en}"
    if adj is None:
        es = f"{det_es} {noun_es}"
    else:
        form = (adj.fp if n.fem else adj.mp) if plural else (adj.fs if n.fem else adj.ms)
        es = f"{det_es} {noun_es} {form}"
    return en, es, plural


def _subject(rng: random.Random) -> tuple[str, int, str]:
    return rng.choice(SUBJECTS)


def _verb_en(base: str, third: str, person: int, subj: str) -> str:
    return third if person == 2 and subj not in ("i", "you") else base


def grammar_pair(rng: random.Random) -> tuple[str, str]:
    """One (english, spanish) sentence pair with an exact translation."""
    form = rng.randrange(6)
    if form == 0:  # subject verb object [place] [time]
        s_en, p, s_es = _subject(rng)
        v_en, v3, v_es = rng.choice(VERBS)
        o_en, o_es, _ = _noun_phrase(rng)
        en = f"{s_en} {_verb_en(v_en, v3, p, s_en)} {o_en}"
        es = f"{s_es + ' ' if s_es else ''}{v_es[p]} {o_es}"
        if rng.random() < 0.4:
            pl_en, pl_es = rng.choice(PLACES)
            en, es = f"{en} {pl_en}", f"{es} {pl_es}"
        if rng.random() < 0.3:
            t_en, t_es = rng.choice(TIMES)
            en, es = f"{en} {t_en}", f"{es} {t_es}"
        return en, es
    if form == 1:  # subject intransitive place/time
        s_en, p, s_es = _subject(rng)
        v_en, v3, v_es = rng.choice(INTRANS)
        en = f"{s_en} {_verb_en(v_en, v3, p, s_en)}"
        es = f"{s_es + ' ' if s_es else ''}{v_es[p]}"
        pl_en, pl_es = rng.choice(PLACES)
        en, es = f"{en} {pl_en}", f"{es} {pl_es}"
        if rng.random() < 0.5:
            t_en, t_es = rng.choice(TIMES)
            en, es = f"{en} {t_en}", f"{es} {t_es}"
        return en, es
    if form == 2:  # the X is/are place
        n_en, n_es, plural = _noun_phrase(rng, allow_number=False)
        pl_en, pl_es = rng.choice(PLACES)
        be_en, be_es = ("are", "están") if plural else ("is", "está")
        return f"{n_en} {be_en} {pl_en}", f"{n_es} {be_es} {pl_es}"
    if form == 3:  # where is / are
        n_en, n_es, plural = _noun_phrase(rng, allow_number=False)
        be_en, be_es = ("are", "están") if plural else ("is", "está")
        return f"where {be_en} {n_en}", f"dónde {be_es} {n_es}"
    if form == 4:  # i like
        n_en, n_es, plural = _noun_phrase(rng, allow_number=False)
        n_en = re.sub(r"^(a|an) ", "the ", n_en)
        n_es = re.sub(r"^una ", "la ", re.sub(r"^un ", "el ", n_es))
        if n_en.startswith("my ") and plural:
            pass
        who = rng.choice(
            [("i like", "me gusta", "me gustan"), ("we like", "nos gusta", "nos gustan")]
        )
        return f"{who[0]} {n_en}", f"{who[2] if plural else who[1]} {n_es}"
    # subject is adjective-less place: "we are in the park"
    s_en, p, s_es = rng.choice(
        [s for s in SUBJECTS if s[1] in _BE and s[0] in ("i", "you", "he", "she", "we", "they")]
    )
    be_en, be_es = _BE[p]
    if s_en in ("you", "we", "they"):
        be_en = "are"
    pl_en, pl_es = rng.choice(PLACES)
    t_en, t_es = rng.choice(TIMES)
    return f"{s_en} {be_en} {pl_en} {t_en}", f"{s_es + ' ' if s_es else ''}{be_es} {pl_es} {t_es}"


# --- offline prose --------------------------------------------------------------------------

_WORD = re.compile(r"^[a-z']+$")


def fortune_sentences(
    root: Path = FORTUNE_DIR, min_words: int = 3, max_words: int = 12
) -> list[str]:
    """Short plain sentences from Debian's fortune files, normalised, sorted, unique."""
    out: set[str] = set()
    if not root.is_dir():
        return []
    for f in sorted(root.iterdir()):
        if f.suffix or not f.is_file() or f.is_symlink():
            continue
        try:
            raw = f.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        for cookie in raw.split("\n%\n"):
            flat = " ".join(cookie.split())
            if "--" in flat or "http" in flat:
                flat = flat.split("--")[0]
            for sent in re.split(r"(?<=[.!?])\s+", flat):
                if re.search(r"[0-9@#$%^&*_=+<>{}\[\]|\\/~`]", sent) or not sent[:1].isupper():
                    continue
                if sent.count('"') % 2 or ":" in sent or ";" in sent:
                    continue
                norm = normalize(sent)
                words = norm.split()
                if min_words <= len(words) <= max_words and all(_WORD.match(w) for w in words):
                    if len(norm) <= 70:
                        out.add(norm)
    return sorted(out)


def apertium_available() -> bool:
    return shutil.which("apertium") is not None


def apertium_en_es(sentences: Sequence[str]) -> list[str]:
    """Translate sentences offline with apertium eng-spa (one process for all), normalised."""
    if not sentences:
        return []
    joined = "\n".join(s.replace("\n", " ") + "." for s in sentences) + "\n"
    res = subprocess.run(
        ["apertium", "-u", "eng-spa"], input=joined, capture_output=True, text=True, check=True
    )
    lines = res.stdout.rstrip("\n").split("\n")
    if len(lines) != len(sentences):
        raise RuntimeError(f"apertium returned {len(lines)} lines for {len(sentences)}")
    return [normalize(x.replace("¿", " ").replace("¡", " ")) for x in lines]


def split_holdout(items: Iterable[str], seed: int, fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split of a sorted list."""
    items = sorted(set(items))
    rng = random.Random(seed)
    rng.shuffle(items)
    k = int(len(items) * fraction)
    return items[k:], items[:k]
