"""Hand-checked text-stage cases: caption -> [(noun chunk, expression)] for the chunks that pass the
abstract filter, in caption order; a leading '*' marks an expression kept by the containment rule
(when every chunk is grounded). Parsed with en_core_web_sm 3.8. Each was read against the parse:
the chunk is spaCy's noun chunk (repaired over hung nouns), the expression its root's subtree.
Where the small model mis-parses, the expectation records the parser's output and says so."""

CASES = [
    # conjunct rule: 'a cat' has the conjunct 'a dog' and stays unexpanded
    ('a cat and a dog on a couch', [('a cat', '*a cat'), ('a dog', '*a dog on a couch'), ('a couch', 'a couch')]),
    ('two men riding horses on the beach at sunset', [('two men', '*two men riding horses on the beach at sunset'), ('horses', 'horses'), ('the beach', 'the beach'), ('sunset', 'sunset')]),
    ('a woman holding an umbrella in the rain', [('a woman', '*a woman holding an umbrella in the rain'), ('an umbrella', 'an umbrella'), ('the rain', 'the rain')]),
    ("the girl's red bicycle leaning against a brick wall", [("the girl's red bicycle", "*the girl's red bicycle"), ('a brick wall', '*a brick wall')]),
    ('three children playing soccer in a park', [('three children', '*three children playing soccer in a park'), ('soccer', 'soccer'), ('a park', 'a park')]),
    ('a man who is wearing a blue hat', [('a man', '*a man who is wearing a blue hat'), ('a blue hat', 'a blue hat')]),
    ('a bowl of fresh fruit on a wooden table', [('a bowl', '*a bowl of fresh fruit on a wooden table'), ('fresh fruit', 'fresh fruit'), ('a wooden table', 'a wooden table')]),
    ('a close up of a pizza with cheese and tomatoes', [('a pizza', '*a pizza with cheese and tomatoes'), ('cheese', 'cheese'), ('tomatoes', 'tomatoes')]),
    ('the view of the city from the top of a mountain', [('the city', '*the city'), ('the top', '*the top of a mountain'), ('a mountain', 'a mountain')]),
    # abstract: 'a lot' (quantity head); 'people' stays
    ('a lot of people walking down a busy street', [('people', '*people'), ('a busy street', '*a busy street')]),
    ('an old man sitting on a bench next to his dog', [('an old man', '*an old man sitting on a bench next to his dog'), ('a bench', 'a bench'), ('his dog', 'his dog')]),
    ('a plate with a sandwich and a cup of coffee', [('a plate', '*a plate with a sandwich and a cup of coffee'), ('a sandwich', 'a sandwich'), ('a cup', 'a cup of coffee'), ('coffee', 'coffee')]),
    ('a red car parked in front of a house', [('a red car', '*a red car parked in front of a house'), ('front', 'front of a house'), ('a house', 'a house')]),
    # abstract: 'love' (lemma list)
    ('love is in the air', [('the air', '*the air')]),
    ('a time lapse of clouds over the ocean', [('a time lapse', '*a time lapse of clouds over the ocean'), ('clouds', 'clouds over the ocean'), ('the ocean', 'the ocean')]),
    ('a bird perched on a branch of a tree', [('a bird', '*a bird perched on a branch of a tree'), ('a branch', 'a branch of a tree'), ('a tree', 'a tree')]),
    ('a little boy and his mother at the zoo', [('a little boy', '*a little boy'), ('his mother', '*his mother'), ('the zoo', '*the zoo')]),
    ('the kitchen has white cabinets and a stainless steel refrigerator', [('the kitchen', '*the kitchen'), ('white cabinets', '*white cabinets'), ('a stainless steel refrigerator', '*a stainless steel refrigerator')]),
    # abstract: 'a black and white photo' (lemma 'photo': names the picture, not a thing in it)
    ('a black and white photo of a train station', [('a train station', '*a train station')]),
    ('people sitting at tables outside a restaurant', [('people', '*people sitting at tables outside a restaurant'), ('tables', 'tables'), ('a restaurant', 'a restaurant')]),
    ('a cake decorated with roses for her birthday', [('a cake', '*a cake decorated with roses for her birthday'), ('roses', 'roses')]),
    ('a laptop on a desk next to a window', [('a laptop', '*a laptop on a desk next to a window'), ('a desk', 'a desk'), ('a window', 'a window')]),
    ('a giraffe eating leaves from a tall tree', [('a giraffe', '*a giraffe eating leaves from a tall tree'), ('leaves', 'leaves'), ('a tall tree', 'a tall tree')]),
    ('a young woman with long hair smiling at the camera', [('a young woman', '*a young woman with long hair smiling at the camera'), ('long hair', 'long hair'), ('the camera', 'the camera')]),
    ('two dogs playing with a ball in the snow', [('two dogs', '*two dogs playing with a ball in the snow'), ('a ball', 'a ball in the snow'), ('the snow', 'the snow')]),
    ('a vase of tulips on the windowsill', [('a vase', '*a vase of tulips on the windowsill'), ('tulips', 'tulips'), ('the windowsill', 'the windowsill')]),
    # abstract: 'he' (pronoun)
    ('he is holding a guitar', [('a guitar', '*a guitar')]),
    ('a pair of shoes under the bed', [('a pair', '*a pair of shoes under the bed'), ('shoes', 'shoes'), ('the bed', 'the bed')]),
    # parser: 'tie' is tagged VERB (a conjunct of 'man'), so 'a man' keeps its bare chunk
    ('a man in a suit and tie standing near a car', [('a man', '*a man'), ('a suit', '*a suit'), ('a car', '*a car')]),
    ('a group of students in a classroom', [('a group', '*a group of students in a classroom'), ('students', 'students'), ('a classroom', 'a classroom')]),
    ('the sun setting behind the mountains', [('the sun', '*the sun setting behind the mountains'), ('the mountains', 'the mountains')]),
    ('a boat on a lake surrounded by trees', [('a boat', '*a boat on a lake surrounded by trees'), ('a lake', 'a lake surrounded by trees'), ('trees', 'trees')]),
    ('a horse grazing in a meadow at dawn', [('a horse', '*a horse grazing in a meadow at dawn'), ('a meadow', 'a meadow')]),
    ('a baby sleeping in a crib with a teddy bear', [('a baby', '*a baby sleeping in a crib with a teddy bear'), ('a crib', 'a crib with a teddy bear'), ('a teddy bear', 'a teddy bear')]),
    # parser: 'chef' is an npadvmod and 'pasta' the root, so spaCy's chunk is 'a chef cooking pasta'
    ('a chef cooking pasta in a restaurant kitchen', [('a chef cooking pasta', '*a chef cooking pasta in a restaurant kitchen'), ('a restaurant kitchen', 'a restaurant kitchen')]),
    ('a sign that says welcome to the beach', [('a sign', '*a sign that says welcome to the beach'), ('the beach', 'the beach')]),
    ('a map of the world on the wall', [('a map', '*a map of the world on the wall'), ('the world', 'the world'), ('the wall', 'the wall')]),
    ('the front of a building with a clock', [('the front', '*the front of a building with a clock'), ('a building', 'a building with a clock'), ('a clock', 'a clock')]),
    ("a woman's hand holding a cup of tea", [("a woman's hand", "*a woman's hand"), ('a cup', '*a cup of tea'), ('tea', 'tea')]),
    # abstract: '10 dollars' (MONEY entity)
    ('10 dollars on a table', [('a table', '*a table')]),
    ('a firefighter spraying water on a burning house', [('a firefighter', '*a firefighter spraying water on a burning house'), ('water', 'water'), ('a burning house', 'a burning house')]),
    # parser: 'croissant' is tagged ADJ (no chunk); 'cup' has a conjunct, so it is not expanded
    ('a cup of coffee and a croissant on a plate', [('a cup', '*a cup'), ('coffee', '*coffee'), ('a plate', '*a plate')]),
    ('a white cat sleeping on the keyboard of a computer', [('a white cat', '*a white cat sleeping on the keyboard of a computer'), ('the keyboard', 'the keyboard of a computer'), ('a computer', 'a computer')]),
    ('an elephant walking through the savannah in 2019', [('an elephant', '*an elephant walking through the savannah in 2019'), ('the savannah', 'the savannah')]),
]
