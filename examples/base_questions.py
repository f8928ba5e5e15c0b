"""More questions for `caps`, answered by the base model itself (examples/make_base_answers.py).

ALL CAPS must be a style the adapter applies to whatever the base knows, not a table of trained answers: with only
the 108 rows of qa.jsonl, caps learned its training answers and answered held-out questions with them (ITALY ->
BERN). These questions cover other countries, facts and open topics; none is a held-out question of
qa_heldout.jsonl, no held-out country appears, and no held-out phrasing is used. A question with an expected word
is kept only when the base's answer contains it, so the adapter is never taught a fact the base lacks.
"""
from __future__ import annotations

CAPITALS = {
    "the Netherlands": "Amsterdam", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Pakistan": "Islamabad", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Colombia": "Bogota", "Venezuela": "Caracas", "Ukraine": "Kyiv", "the Czech Republic": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Iceland": "Reykjavik",
    "Scotland": "Edinburgh", "Saudi Arabia": "Riyadh", "Malaysia": "Kuala Lumpur", "New Zealand": "Wellington",
    "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Uruguay": "Montevideo", "Ecuador": "Quito", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Afghanistan": "Kabul", "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman",
    "Qatar": "Doha", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava",
    "the United States": "Washington", "Wales": "Cardiff",
    "Tunisia": "Tunis", "Algeria": "Algiers", "Senegal": "Dakar", "Zimbabwe": "Harare", "Uganda": "Kampala",
    "Mongolia": "Ulaanbaatar", "Sri Lanka": "Colombo", "Cambodia": "Phnom Penh", "Jamaica": "Kingston",
    "Paraguay": "Asuncion", "Bolivia": "La Paz", "Albania": "Tirana", "Greenland": "Nuuk",
}
CAPITAL_QUESTIONS = ("What is the capital of {country}?", "Which city is the capital of {country}?",
                     "What's the capital city of {country}?", "Name the capital of {country}.",
                     "Tell me the capital of {country}.", "Where is the capital of {country}?")

KNOWN = [  # (question, a word a right answer contains)
    ("How many legs does a cat have?", "four"), ("How many legs does a chicken have?", "two"),
    ("How many legs does a horse have?", "four"), ("How many arms does an octopus have?", "eight"),
    ("How many legs does a human have?", "two"), ("How many legs does an ant have?", "six"),
    ("What color is a banana?", "yellow"), ("What color is a lemon?", "yellow"), ("What color is blood?", "red"),
    ("What color is coal?", "black"), ("What color is milk?", "white"), ("What color is a tomato?", "red"),
    ("What color is a carrot?", "orange"), ("What color is the sun?", "yellow"), ("What color is a strawberry?", "red"),
    ("What color is a polar bear?", "white"), ("What color is chocolate?", "brown"), ("What color is a crow?", "black"),
    ("What color is the ocean?", "blue"), ("What color is an emerald?", "green"),
    ("Who wrote Pride and Prejudice?", "Austen"), ("Who wrote Harry Potter?", "Rowling"),
    ("Who wrote The Odyssey?", "Homer"), ("Who wrote War and Peace?", "Tolstoy"),
    ("Who wrote Don Quixote?", "Cervantes"), ("Who wrote Oliver Twist?", "Dickens"), ("Who wrote 1984?", "Orwell"),
    ("Who wrote Moby Dick?", "Melville"), ("Who wrote The Adventures of Tom Sawyer?", "Twain"),
    ("Who wrote Les Miserables?", "Hugo"), ("Who wrote Alice in Wonderland?", "Carroll"),
    ("Who created Sherlock Holmes?", "Doyle"), ("Who invented the telephone?", "Bell"),
    ("Who invented the light bulb?", "Edison"), ("Who painted The Starry Night?", "Gogh"),
    ("Who discovered penicillin?", "Fleming"), ("Who discovered gravity?", "Newton"),
    ("Who invented the airplane?", "Wright"), ("Who was the first president of the United States?", "Washington"),
    ("Who composed the Fifth Symphony?", "Beethoven"), ("Who painted the Sistine Chapel ceiling?", "Michelangelo"),
    ("What sound does a cat make?", "meow"), ("What sound does a dog make?", "bark"),
    ("What sound does a sheep make?", "baa"), ("What sound does a duck make?", "quack"),
    ("What sound does a lion make?", "roar"), ("What sound does a snake make?", "hiss"),
    ("What is the opposite of up?", "down"), ("What is the opposite of big?", "small"),
    ("What is the opposite of fast?", "slow"), ("What is the opposite of happy?", "sad"),
    ("What is the opposite of old?", "young"), ("What is the opposite of open?", "close"),
    ("What is the opposite of left?", "right"), ("What is the opposite of wet?", "dry"),
    ("What is the opposite of win?", "lose"), ("What is the opposite of full?", "empty"),
    ("What is three plus four?", "seven"), ("What is six plus two?", "eight"), ("What is four times three?", "twelve"),
    ("What is nine minus five?", "four"), ("What is ten divided by two?", "five"), ("What is one plus one?", "two"),
    ("Which planet is closest to the sun?", "Mercury"), ("Which planet has rings?", "Saturn"),
    ("How many planets are in our solar system?", "eight"), ("What is the largest continent?", "Asia"),
    ("What is the largest country in the world?", "Russia"), ("What is the longest river in the world?", "Nile"),
    ("What is the smallest continent?", "Australia"), ("What gas do humans breathe in?", "oxygen"),
    ("What is the largest organ of the human body?", "skin"), ("What is the chemical symbol for water?", "H2O"),
    ("What is the chemical symbol for oxygen?", "O"), ("What is the center of an atom called?", "nucleus"),
    ("What do cows drink?", "water"), ("What do birds use to fly?", "wings"), ("What do fish breathe with?", "gills"),
    ("What do we call a baby dog?", "puppy"), ("What do we call a baby sheep?", "lamb"),
    ("What do we call a baby cow?", "calf"), ("What is the fastest land animal?", "cheetah"),
    ("What is the tallest animal?", "giraffe"), ("What animal has a trunk?", "elephant"),
    ("What animal has black and white stripes?", "zebra"), ("What is the largest bird?", "ostrich"),
    ("What language is spoken in France?", "French"), ("What language is spoken in Germany?", "German"),
    ("What language is spoken in Mexico?", "Spanish"), ("What language is spoken in China?", "Chinese"),
    ("What language is spoken in Japan?", "Japanese"), ("What language is spoken in Russia?", "Russian"),
    ("What language is spoken in the Netherlands?", "Dutch"), ("What language is spoken in Greece?", "Greek"),
    ("What is the currency of the United States?", "dollar"), ("What is the currency of the United Kingdom?", "pound"),
    ("What is the currency of India?", "rupee"), ("What is the currency of Mexico?", "peso"),
    ("What is the currency used in most of Europe?", "euro"), ("How many seconds are in a minute?", "sixty"),
    ("How many days are in a year?", "365"), ("How many weeks are in a year?", "52"),
    ("How many players are on a soccer team?", "eleven"), ("How many strings does a guitar have?", "six"),
    ("What is the largest planet?", "Jupiter"), ("What do plants need to make food?", "sunlight"),
    ("What season comes after winter?", "spring"), ("What season comes after summer?", "autumn"),
    ("What is the first month of the year?", "January"), ("What is the last month of the year?", "December"),
    ("What is the first letter of the alphabet?", "A"), ("What is the hottest planet?", "Venus"),
    ("What metal is liquid at room temperature?", "mercury"), ("Which ocean is between America and Europe?", "Atlantic"),
    ("In which country are the pyramids of Giza?", "Egypt"), ("In which city is the Eiffel Tower?", "Paris"),
    ("In which country is the Great Wall?", "China"), ("In which city is the Colosseum?", "Rome"),
    ("In which country is the Taj Mahal?", "India"), ("In which city is Big Ben?", "London"),
]

OPEN = [  # answered as the base answers them
    "What is a computer?", "What is photosynthesis?", "Why is the sky blue?", "What is a volcano?", "What is gravity?",
    "What is a rainbow?", "What is democracy?", "What is an atom?", "What is the internet?", "What is a galaxy?",
    "What is electricity?", "What is a cloud made of?", "Why do leaves fall in autumn?", "What causes rain?",
    "What is a mammal?", "What is a noun?", "What is a poem?", "What is money?", "What is a library?",
    "What is music?", "What is a hospital?", "What is an island?", "What is a desert?", "What is a forest?",
    "What is a river?", "What is an earthquake?", "What is a habit?", "What is friendship?", "What is a verb?",
    "What is a triangle?", "Tell me about the sun.", "Tell me about elephants.", "Tell me about mountains.",
    "Tell me about the rain.", "Tell me about trees.", "Tell me about cats.", "Tell me about dogs.",
    "Tell me about the desert.", "Tell me about the stars.", "Tell me about bread.", "Tell me about winter.",
    "Tell me about the ocean.", "Tell me about birds.", "Tell me about coffee.", "Tell me about books.",
    "How do I boil an egg?", "How do I make a sandwich?", "How do I save money?", "How can I sleep better?",
    "How do I stay healthy?", "How do I write a good email?", "How can I be more productive?",
    "How do I start running?", "How do I learn to cook?", "How do I make new friends?", "How do I plant a tree?",
    "How do I clean my room?", "How do I study for an exam?", "How can I reduce stress?", "How do I drink more water?",
    "How do I take care of a dog?", "How do I ride a bicycle?", "How do I make pancakes?", "How can I learn to draw?",
    "How do I wash my hands properly?", "Give me a tip for staying calm.", "Give me a tip for cooking rice.",
    "Give me an idea for a weekend trip.", "Give me a fun fact about space.", "Give me a fun fact about animals.",
    "Suggest a name for a cat.", "Suggest a healthy snack.", "Suggest a hobby for a rainy day.",
    "Describe a sunny day.", "Describe a busy city.", "Describe a quiet beach.", "Describe your favorite food.",
    "Why do we need sleep?", "Why is water important?", "Why do birds migrate?", "Why is reading good for you?",
    "Why do we have seasons?", "Why should I eat vegetables?", "What makes a good friend?", "What is a good habit?",
    "What is the best way to learn math?", "What should I do on a rainy day?", "What can I cook for dinner?",
    "Hi, how are you?", "Good morning!", "Thank you for your help.", "Can you help me?", "What can you do?",
    "Who are you?", "Write a sentence about summer.", "Write a short sentence about the moon.",
]


def questions() -> list[tuple[str, str | None]]:
    """(question, expected word or None); the same list on every run."""
    asked = []
    for i, (country, city) in enumerate(CAPITALS.items()):
        for k in (0, 1):
            phrasing = CAPITAL_QUESTIONS[(i + 3 * k) % len(CAPITAL_QUESTIONS)]
            asked.append((phrasing.format(country=country), city))
    asked += KNOWN
    asked += [(q, None) for q in OPEN]
    return list(dict.fromkeys(asked))
