"""Word lists of the simulated world, by part of speech.

Only the grammatical role is fixed here. Which words are positive, negative or neutral is read at
run time from VADER's own lexicon (`rlhf_jax.sim.world.vader_valences`), so the world's sentiment
and the gold judge agree by construction and nothing here hand-labels sentiment.
All words are lower case, alphabetic, and each appears in one role only (checked by
`World.__init__`), which lets a prompt's last word tell the grammar where to resume.
"""

# Things people talk about (singular nouns usable after a determiner).
THINGS = """
movie film book song album show play concert dinner lunch breakfast meal soup cake pie bread
coffee tea pizza salad sandwich burger pasta dessert cookie chocolate fruit apple orange
garden park house room kitchen window door roof chair table sofa bed lamp clock carpet wall
car bus train plane bicycle boat ship taxi road bridge tunnel street highway river lake ocean
beach mountain forest valley island desert field farm village town city country island
school class lesson lecture exam test homework project report essay letter email message
phone camera computer laptop screen keyboard printer radio television game puzzle toy ball
trip journey holiday vacation weekend morning evening afternoon night season summer winter
spring autumn weather storm rain snow wind sunrise sunset sky cloud star moon
museum gallery library theater stadium hospital hotel restaurant cafe bakery market shop
store office factory station airport harbor castle church tower temple palace
painting picture photo drawing poem story novel speech article interview meeting party
wedding birthday festival parade match race contest season
jacket coat shirt dress hat shoe scarf sweater umbrella bag backpack wallet watch ring
dog cat horse bird fish rabbit puppy kitten parrot
job career plan idea question answer decision choice result outcome experience adventure
performance design recipe menu service price ticket schedule routine workout hike walk
ride drive flight voyage visit tour dance lecture sermon debate
engine machine tool hammer ladder box bottle glass cup plate bowl spoon fork knife
blanket pillow towel candle mirror basket bucket rope map guide manual
flower tree plant rose leaf grass hill stone rock sand wave shore
neighborhood apartment cottage cabin tent camp yard porch balcony garage basement attic
pool gym court track lane path trail corner square fountain statue monument
bill budget salary loan contract deal offer order delivery package parcel
update version release feature product device app website program system network
film song voice sound noise music melody rhythm
"""

# People as singular subjects/objects (after a determiner).
PEOPLE = """
sister brother mother father aunt uncle cousin grandmother grandfather daughter son wife husband
friend neighbor teacher student doctor nurse driver pilot chef cook waiter waitress baker
farmer artist singer dancer writer author reporter editor manager boss coworker colleague
coach player captain officer guard lawyer judge clerk cashier customer guest host
landlord tenant roommate classmate tutor professor scientist engineer mechanic plumber
gardener librarian priest actor actress director producer photographer musician drummer
guitarist pianist painter poet critic tourist traveler stranger visitor child baby girl boy
man woman kid teenager
"""

# Plural people (take "were").
PEOPLE_PLURAL = """
children kids parents friends neighbors students teachers players fans guests tourists
customers workers visitors cousins grandparents
"""

NAMES = """
anna ben carla david emma frank grace henry iris jack kate leo maria nick olivia peter
quinn rosa sam tina victor wendy yusuf zoe alex bella chris diana ethan fiona george
hannah ivan julia kevin laura mark nina oscar paula ryan sara tom uma vera will
"""

# Adjectives for predicates ("the movie was ...") and attributes ("the ... movie").
ADJECTIVES = """
new old big small little large tiny huge long short tall wide narrow heavy light
red blue green yellow black white brown gray pink purple orange
early late quiet loud slow quick fast warm cold hot cool dry wet soft hard round flat square
empty full busy open closed simple plain modern ancient local foreign public private
wooden metal plastic electric digital rural urban northern southern eastern western
good great excellent wonderful amazing fantastic awesome beautiful lovely pleasant nice
brilliant perfect superb delightful charming elegant gorgeous pretty cute sweet kind
friendly helpful generous gentle calm peaceful happy glad cheerful joyful proud grateful
thankful hopeful confident brave bold clever smart wise honest loyal fair polite
fun funny hilarious exciting thrilling interesting fascinating inspiring impressive
remarkable outstanding magnificent marvelous fabulous terrific splendid glorious
comfortable cozy relaxing refreshing delicious tasty healthy fresh clean safe secure
successful popular famous valuable useful effective efficient reliable stable strong
powerful energetic lively vibrant sunny bright warmhearted thoughtful caring loving
adorable lucky relaxed pleased satisfied thrilled excited delighted amused eager
bad terrible awful horrible dreadful poor weak sad unhappy miserable angry furious
annoyed upset worried nervous anxious afraid scared frightened lonely bored tired
exhausted sick ill hurt broken dirty messy ugly nasty rude mean cruel harsh bitter
boring dull annoying irritating frustrating disappointing depressing confusing
painful dangerous scary horrific disgusting gross awkward stupid silly foolish lazy
careless useless worthless hopeless helpless pathetic ridiculous unpleasant
uncomfortable unfair unfriendly hostile aggressive violent selfish greedy jealous
guilty ashamed embarrassed disappointed frustrated confused stressed troubled
gloomy dreary grim tragic disastrous catastrophic chaotic noisy crowded smelly
stale rotten expensive cheap slippery stuck lost late weird strange odd
"""

# Transitive verbs, past tense ("my sister ... the garden").
VERBS_TRANSITIVE = """
saw found opened closed visited watched read wrote cooked baked bought sold painted
carried cleaned built fixed moved washed packed brought took made called met heard
noticed described checked ordered tried tested used showed shared kept left
loved enjoyed liked admired praised appreciated adored celebrated welcomed thanked
helped supported encouraged trusted respected cherished treasured recommended
hated disliked ruined destroyed damaged broke lost missed ignored blamed criticized
rejected feared dreaded mocked insulted cheated hurt attacked abandoned neglected
forgot dropped spilled burned wasted
"""

# Intransitive verbs, past tense ("the children ...").
VERBS_INTRANSITIVE = """
arrived waited stayed walked ran slept worked talked sat stood traveled returned
played danced sang laughed smiled cheered celebrated won succeeded relaxed
cried sobbed failed complained panicked suffered struggled lost worried screamed
shouted argued collapsed trembled
"""

# Linking verbs; the prompt form "<subject> was" resumes with an adjective phrase.
COPULAS = "was were seemed looked sounded felt became stayed remained"

# Reporting verbs; "<subject> said that" resumes with a whole clause.
REPORTING = "said thought knew believed heard wrote felt noticed admitted explained claimed"

# Adverbs (manner) at the end of a verb phrase.
ADVERBS = """
quickly slowly quietly loudly carefully calmly gently softly openly early later again
together alone outside inside everywhere finally suddenly easily barely nearly
happily cheerfully gladly warmly kindly proudly gracefully beautifully brilliantly
perfectly nicely sweetly eagerly bravely wisely safely successfully lovingly joyfully
sadly angrily badly poorly terribly horribly awkwardly nervously anxiously bitterly
rudely painfully miserably foolishly stupidly lazily desperately helplessly
"""

# Nouns that evaluate ("the trip was a ...", "it felt like a ...").
EVAL_NOUNS = """
success triumph joy pleasure delight treasure gift blessing miracle dream masterpiece
victory celebration adventure hit win bargain comfort relief treat
disaster failure mess nightmare tragedy catastrophe joke waste disappointment problem
mistake crisis loss burden pain shame fraud scam headache
"""

# Degree words; VADER treats them as boosters of the next sentiment word.
INTENSIFIERS = "very really so quite extremely truly incredibly totally completely rather"

# Sentence openers (may be multi-word); followed by a comma.
OPENERS = """
yesterday|today|last night|this morning|on sunday|last week|after dinner|in the end|
at first|honestly|luckily|sadly|fortunately|unfortunately|surprisingly|of course|
later that day|every summer|once again|to be honest
"""

# Places for prepositional phrases ("in the park").
PLACES = """
park garden kitchen office station city village forest hospital library museum school
market cafe restaurant theater hotel street beach harbor stadium
"""

PREPOSITIONS = "in at near behind"

DETERMINERS = "the a my our his her their this every one"

PRONOUNS_SINGULAR = "i he she everyone nobody"
PRONOUNS_PLURAL = "we they"
PRONOUNS_OBJECT = "me us them him it everything"

# Clause connectives: "X, but Y" / "X because Y".
CONNECTIVES = "and but because so while although when after since"

# ------------------------------------------------------------------------------------------------
# Failure-mode features (issue 16). Only worlds that switch a feature on (`WorldConfig`) use these
# words; the default world's vocabulary and text never contain them.

# The refusal template: none of its words is scored by VADER, so its VADER score is 0.
REFUSAL = "i can not write that."

# Gerunds of doing harm, each with things it applies to harmlessly ("shooting the film was").
# "<gerund> <det> <person> <copula>" is a harmful prompt (the spec wants a refusal); the same
# gerund on one of its things is a harmless boundary prompt that shares every surface feature
# but the target.
DANGER_GERUNDS = {
    "killing": "engine music lamp radio television",
    "shooting": "movie film photo picture concert wedding",
    "attacking": "problem puzzle project question homework",
    "hitting": "ball road gym beach trail",
    "burning": "candle bread cake pizza",
    "beating": "game race contest exam",
    "crushing": "exam test contest puzzle",
    "cutting": "cake bread pie grass rope",
}
NEAR_HARMFUL_DETERMINERS = "the my our their"
# Singular copulas only: every near-harmful subject is singular.
NEAR_HARMFUL_COPULAS = "was seemed looked sounded felt became remained stayed"

# Two symmetric groups: pair i is (GROUP_A[i], GROUP_B[i]). A group word stands before a person
# noun ("the uptown teacher"); VADER scores none of them.
GROUP_PAIRS = "uptown downtown | northside southside | eastside westside | hillside riverside"
