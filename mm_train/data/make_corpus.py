"""Generates the default training corpus that ships with mm_train (``corpus/mm_corpus.txt``).

The text is produced from templates written for this project: weather reports, timetables, shop
ledgers, arithmetic drills, short fables, letters and tiny Python functions about invented places
and people. Documents are separated by one blank line. The generator is deterministic: the same
``--seed`` and ``--size-kb`` give the same bytes, so the committed file can be regenerated with

    python -m mm_train.data.make_corpus --output mm_train/data/corpus/mm_corpus.txt

The regular structure (repeated phrases, correct arithmetic, consistent formats) lets a tiny model's
loss fall visibly within a few dozen iterations, while the random choices keep documents varied.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_SEED = 20240611
DEFAULT_SIZE_KB = 384
DEFAULT_OUTPUT = Path(__file__).parent / "corpus" / "mm_corpus.txt"

TOWNS = ["Harrowby", "Corbel", "Dunmere", "Ashwick", "Fenlow", "Marrow Cross", "Tillbury", "Oakhollow",
         "Wrenfield", "Stonebridge", "Lowmarsh", "Kestrel Bay", "Pellingham", "Quarry End", "Brightwater"]
NAMES = ["Mira", "Tobin", "Ansel", "Greta", "Ilya", "Noor", "Bram", "Sefa", "Lotte", "Ravi", "Odile", "Kasper",
         "Wren", "Juno", "Hale", "Petra", "Emeric", "Talia", "Oskar", "Yara"]
ANIMALS = ["fox", "heron", "badger", "otter", "hare", "crow", "mole", "owl", "beaver", "stoat"]
PLACES = ["the old bridge", "the mill pond", "the birch wood", "the chalk hill", "the reed bank",
          "the orchard wall", "the lighthouse steps", "the empty barn", "the river bend", "the quarry rim"]
OBJECTS = ["a silver button", "a blue feather", "a round pebble", "a length of string", "a bent key",
           "a clay marble", "a copper bell", "a pine cone", "a paper boat", "a striped shell"]
FEELINGS = ["pleased", "puzzled", "tired", "curious", "proud", "uneasy", "cheerful", "thoughtful"]
GOODS = [("lamp", "lamps"), ("cup", "cups"), ("blanket", "blankets"), ("candle", "candles"),
         ("basket", "baskets"), ("kettle", "kettles"), ("rope", "ropes"), ("jar of honey", "jars of honey"),
         ("loaf", "loaves"), ("spoon", "spoons"), ("lantern", "lanterns"), ("bucket", "buckets")]
STREETS = ["Mill Street", "Chapel Lane", "Harbour Road", "Tanner Row", "Well Close", "Market Square"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
SKIES = ["clear skies", "light rain", "heavy rain", "thin cloud", "thick fog", "scattered showers",
         "bright sunshine", "low cloud", "drizzle", "a passing storm"]
WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


def weather_report(rng: random.Random) -> str:
    """A day's weather for an invented town: three periods, temperatures, wind."""
    town = rng.choice(TOWNS)
    day = rng.randint(1, 28)
    month = rng.choice(MONTHS)
    base = rng.randint(-2, 24)
    lines = [f"Weather report for {town}, {day} {month}."]
    for period, delta in (("Morning", 0), ("Afternoon", rng.randint(1, 6)), ("Evening", rng.randint(-4, 2))):
        lines.append(f"{period}: {rng.choice(SKIES)}, {base + delta} degrees.")
    wind = rng.choice(WINDS)
    speed = rng.randint(2, 45)
    lines.append(f"Wind from the {wind} at {speed} km/h.")
    if speed > 35:
        lines.append(f"A warning for strong wind is in place for {town} until midnight.")
    else:
        lines.append(f"No warnings are in place for {town}.")
    return "\n".join(lines)


def timetable(rng: random.Random) -> str:
    """A train's calling points with times that increase along the route."""
    number = rng.randint(100, 999)
    stops = rng.sample(TOWNS, rng.randint(3, 6))
    minutes = rng.randint(5 * 60, 20 * 60)
    lines = [f"Train {number} from {stops[0]} to {stops[-1]}."]
    for index, stop in enumerate(stops):
        clock = f"{minutes // 60:02d}:{minutes % 60:02d}"
        if index == 0:
            lines.append(f"Departs {stop} at {clock}.")
        elif index == len(stops) - 1:
            lines.append(f"Arrives in {stop} at {clock}.")
        else:
            lines.append(f"Calls at {stop} at {clock}.")
        minutes += rng.randint(6, 40)
    lines.append(f"Train {number} has {rng.randint(2, 9)} carriages and a {rng.choice(['quiet', 'bicycle', 'dining'])} coach.")
    return "\n".join(lines)


def ledger(rng: random.Random) -> str:
    """A shop's sales for one day, with a correct total of items sold."""
    street = rng.choice(STREETS)
    day = rng.choice(DAYS)
    owner = rng.choice(NAMES)
    items = rng.sample(GOODS, rng.randint(2, 5))
    counts = [rng.randint(1, 12) for _ in items]
    lines = [f"Ledger of the shop on {street}, kept by {owner}, for {day}."]
    for (single, plural), count in zip(items, counts, strict=True):
        price = rng.randint(1, 30)
        noun = single if count == 1 else plural
        lines.append(f"Sold {count} {noun} at {price} coins each, {count * price} coins in all.")
    lines.append(f"Items sold on {day}: {sum(counts)}.")
    return "\n".join(lines)


def arithmetic(rng: random.Random) -> str:
    """A drill of additions, subtractions and multiplications, all correct."""
    lines = [f"Exercise {rng.randint(1, 400)}."]
    for _ in range(rng.randint(4, 9)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = rng.randrange(3)
        if kind == 0:
            lines.append(f"{a} plus {b} equals {a + b}.")
        elif kind == 1:
            high, low = max(a, b), min(a, b)
            lines.append(f"{high} minus {low} equals {high - low}.")
        else:
            a, b = a % 13, b % 13
            lines.append(f"{NUMBER_WORDS[a]} times {NUMBER_WORDS[b]} is {a * b}.")
    return "\n".join(lines)


def fable(rng: random.Random) -> str:
    """A short story of an animal that finds something and brings it home."""
    animal = rng.choice(ANIMALS)
    name = rng.choice(NAMES)
    home, found_at = rng.sample(PLACES, 2)
    thing = rng.choice(OBJECTS)
    days = rng.randint(2, 9)
    friend = rng.choice([a for a in ANIMALS if a != animal])
    sentences = [
        f"Once a small {animal} named {name} lived near {home}.",
        f"Every morning {name} walked to {found_at} and back again.",
        f"One day {name} found {thing} at {found_at}.",
        f"{name} carried {thing} home and felt {rng.choice(FEELINGS)}.",
        f"For {NUMBER_WORDS[days]} days {name} kept {thing} under a leaf.",
        f"Then a {friend} came by and asked about {thing}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"{name} gave {thing} to the {friend}, and the two became friends.")
    else:
        sentences.append(f"{name} showed the {friend} {found_at}, and they looked for more together.")
    return " ".join(sentences)


def letter(rng: random.Random) -> str:
    """A short letter between two people about a visit."""
    writer, reader = rng.sample(NAMES, 2)
    town = rng.choice(TOWNS)
    day = rng.choice(DAYS)
    thing = rng.choice(OBJECTS)
    return "\n".join([
        f"Dear {reader},",
        f"thank you for your letter from {town}. I will arrive on {day} by the {rng.choice(['early', 'late'])} train.",
        f"Please keep {thing} for me; I would like to see it again.",
        f"Here we have had {rng.choice(SKIES)} all week.",
        "With best wishes,",
        f"{writer}",
    ])


def python_function(rng: random.Random) -> str:
    """A tiny Python function with a docstring and a worked example."""
    k = rng.randint(1, 20)
    x = rng.randint(0, 50)
    kind = rng.randrange(3)
    if kind == 0:
        name, body, result, text = f"add_{k}", f"x + {k}", x + k, f"Returns x plus {k}."
    elif kind == 1:
        name, body, result, text = f"times_{k}", f"x * {k}", x * k, f"Returns x times {k}."
    else:
        name, body, result, text = f"is_multiple_of_{k}", f"x % {k} == 0", x % k == 0, f"True when x is a multiple of {k}."
    return "\n".join([
        f"def {name}(x):",
        f'    """{text}"""',
        f"    return {body}",
        f"assert {name}({x}) == {result}",
    ])


def counting(rng: random.Random) -> str:
    """An ordered list: days, months or a stepped count."""
    kind = rng.randrange(3)
    if kind == 0:
        start = rng.randrange(7)
        days = [DAYS[(start + i) % 7] for i in range(7)]
        return f"The week starting on {days[0]}: " + ", ".join(days) + "."
    if kind == 1:
        start = rng.randrange(12)
        months = [MONTHS[(start + i) % 12] for i in range(rng.randint(4, 12))]
        return f"Months from {months[0]}: " + ", ".join(months) + "."
    step = rng.randint(2, 9)
    first = rng.randint(0, 20)
    values = [str(first + step * i) for i in range(rng.randint(6, 14))]
    return f"Counting by {step} from {first}: " + ", ".join(values) + "."


GENERATORS: tuple[Callable[[random.Random], str], ...] = (
    weather_report, timetable, ledger, arithmetic, fable, letter, python_function, counting)


def generate(seed: int = DEFAULT_SEED, size_kb: int = DEFAULT_SIZE_KB) -> str:
    """Returns the corpus text: documents separated by a blank line, at least ``size_kb`` KiB of ASCII."""
    rng = random.Random(seed)
    documents: list[str] = []
    size = 0
    while size < size_kb * 1024:
        document = rng.choice(GENERATORS)(rng)
        documents.append(document)
        size += len(document) + 2
    return "\n\n".join(documents) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: writes the generated corpus to ``--output``."""
    parser = argparse.ArgumentParser(description="Generate the default mm_train corpus.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--size-kb", type=int, default=DEFAULT_SIZE_KB)
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(generate(args.seed, args.size_kb), encoding="utf-8")


if __name__ == "__main__":
    main()
