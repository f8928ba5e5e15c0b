"""Write examples/data/qa.jsonl (training) and qa_heldout.jsonl (held-out check) from the facts below.

The example adapters must change the style and keep the facts. With 40 rows and one capital question per
country, `caps` learned "the capital of X is TOKYO": it memorized answers instead of copying the base's
knowledge. So the training set asks many capitals in varied phrasings (and the demo's question in each),
plus general facts and how-to answers; the held-out file asks other countries and other facts, in phrasings
the training set does not use for them, so a test can see whether the facts survive. Each held-out row
carries `fact`: the word a right answer contains. Deterministic: a fixed seed, no downloads.

    python examples/make_qa_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SEED = 0

TRAIN_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid", "Canada": "Ottawa",
    "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Ireland": "Dublin", "Poland": "Warsaw", "Argentina": "Buenos Aires",
    "Kenya": "Nairobi", "India": "New Delhi", "Mexico": "Mexico City", "Australia": "Canberra",
    "Hungary": "Budapest", "Switzerland": "Bern", "Chile": "Santiago",
}
HELDOUT_CAPITALS = {
    "Italy": "Rome", "England": "London", "Austria": "Vienna", "South Korea": "Seoul", "Thailand": "Bangkok",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Belgium": "Brussels", "Peru": "Lima", "Cuba": "Havana",
}
QUESTIONS = ("What is the capital of {country}?", "What's the capital city of {country}?",
             "Which city is the capital of {country}?", "Name the capital of {country}.",
             "Tell me the capital of {country}.", "Do you know the capital of {country}?")
ANSWERS = ("The capital of {country} is {city}.", "{city} is the capital of {country}.")
HELDOUT_QUESTIONS = ("What city is the capital of {country}?", "Can you tell me what the capital of {country} is?")

FACTS = [  # (question, answer)
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many continents are there?", "There are seven continents on Earth."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is ice made of?", "Ice is frozen water."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the main language spoken in Spain?", "The main language spoken in Spain is Spanish."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What fruit is yellow and curved?", "A banana is yellow and curved."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth."),
    ("Who was the first person to walk on the moon?", "Neil Armstrong was the first person to walk on the moon."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese."),
    ("What is ten minus three?", "Ten minus three is seven."),
    ("What is five times two?", "Five times two is ten."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What do we call frozen rain?", "Frozen rain is called hail or sleet."),
    ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity."),
    ("What is the largest desert in the world?", "The Sahara is the largest hot desert in the world."),
    ("What color are leaves in summer?", "In summer most leaves are green."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
    ("What do pandas eat?", "Pandas eat mostly bamboo."),
    ("What is the smallest prime number?", "The smallest prime number is two."),
    ("Can you give me a tip for better sleep?", "Keep a regular schedule and avoid screens before bed."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag, and let it steep for a few minutes."),
    ("Why is exercise good for you?", "Exercise strengthens your heart, muscles and mood."),
    ("What should I pack for a beach trip?", "Pack sunscreen, a towel, a hat and plenty of water."),
    ("How can I learn a new language?", "Practice a little every day and speak with native speakers."),
    ("Tell me something about the moon.", "The moon orbits the Earth and reflects light from the sun."),
    ("What is a good breakfast?", "Oatmeal with fruit is a good breakfast."),
    ("How do plants grow?", "Plants grow with sunlight, water and nutrients from the soil."),
    ("What is the weather like in winter?", "Winter is usually cold, and in many places it snows."),
    ("Say hello to me.", "Hello! It is nice to meet you."),
    ("Tell me about the sea.", "The sea is a huge body of salt water that covers most of the Earth."),
    ("How do I stay focused while studying?", "Work in short sessions, take breaks and put your phone away."),
]
HELDOUT_FACTS = [  # (question, answer, fact)
    ("How many legs does a dog have?", "A dog has four legs.", "four"),
    ("What color is grass?", "Grass is green.", "green"),
    ("What is the largest country in South America?", "Brazil is the largest country in South America.",
     "Brazil"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Shakespeare"),
    ("Which planet do we live on?", "We live on the planet Earth.", "Earth"),
    ("What is the color of snow?", "Snow is white.", "white"),
    ("What animal says moo?", "A cow says moo.", "cow"),
    ("What is the opposite of day?", "The opposite of day is night.", "night"),
]


def rows() -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows); the same lists on every run."""
    rng = random.Random(SEED)
    train = []
    for country, city in TRAIN_CAPITALS.items():
        asked = QUESTIONS if country == "France" else rng.sample(QUESTIONS, 2)
        for question in asked:
            answer = rng.choice(ANSWERS)
            train.append({"instruction": question.format(country=country),
                          "output": answer.format(country=country, city=city)})
    train += [{"instruction": q, "output": a} for q, a in FACTS]
    rng.shuffle(train)
    heldout = [{"instruction": rng.choice(HELDOUT_QUESTIONS).format(country=country),
                "output": f"The capital of {country} is {city}.", "fact": city}
               for country, city in HELDOUT_CAPITALS.items()]
    heldout += [{"instruction": q, "output": a, "fact": fact} for q, a, fact in HELDOUT_FACTS]
    return train, heldout


def main() -> None:
    train, heldout = rows()
    for name, records in (("qa.jsonl", train), ("qa_heldout.jsonl", heldout)):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{DATA / name}: {len(records)} rows")


if __name__ == "__main__":
    main()
