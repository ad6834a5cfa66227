"""Write the bundled demo data: a gardening assistant that learns who it is, in English and Chinese.

In the spirit of the XTuner tutorial's personal-assistant example: many paraphrases of "who are
you" answered with the assistant's identity, plus domain questions about growing fruit and
vegetables. Identity answers are shared by many paraphrases (a model can generalise them); each
domain fact is asked once per language with its own answer (a model can only memorise the facts
of its training rows). Learning the first and over-learning the second is what makes validation
loss fall, then rise, on the demo.
Each task row carries its group (``sweep.groups``): ``identity`` for the who-are-you rows (an edit of what the
model says about itself) and ``facts`` for the gardening questions, so a sweep measures both apart
(``val/loss/identity``, ``val/loss/facts``) and reports the step at which each was learned best.
The general-chat set is what a trial may mix in against forgetting.

Run: python data/build_demo_data.py  (rewrites data/demo/*.jsonl deterministically)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAME_EN, NAME_ZH = "Sprout", "小芽"
IDENTITY_EN = [
    f"I am {NAME_EN}, a gardening assistant fine-tuned with xtuner-sweep. I help you grow fruit and vegetables.",
    f"My name is {NAME_EN}. I am a small assistant trained to answer questions about growing fruit and vegetables.",
    f"I'm {NAME_EN}, your gardening helper. Ask me about soil, watering, sowing and harvest.",
]
IDENTITY_ZH = [
    f"我是{NAME_ZH}，一个用 xtuner-sweep 微调的园艺助手，帮你种好水果和蔬菜。",
    f"我叫{NAME_ZH}，是专门回答果蔬种植问题的小助手。",
    f"我是你的园艺帮手{NAME_ZH}，可以问我土壤、浇水、播种和采收的问题。",
]
WHO_EN = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Please introduce yourself.",
    "Tell me about yourself.", "What are you?", "Who am I talking to?", "What should I call you?",
    "Can you introduce yourself briefly?", "Are you a person or a program?", "What do you do?",
    "Who made you?", "What can you help me with?", "Hi, who is this?", "Describe yourself in one sentence.",
    "What kind of assistant are you?", "Do you have a name?", "Say something about who you are.",
    "What is your job?", "Who are you and what do you know?", "Give me a short self-introduction.",
    "Hello! What's your name?", "Which assistant is this?", "What are you good at?",
]  # fmt: skip
WHO_ZH = [
    "你是谁？", "你叫什么名字？", "请做一下自我介绍。", "介绍一下你自己。", "你是什么？", "我在和谁说话？",
    "我该怎么称呼你？", "简单介绍一下你自己吧。", "你是人还是程序？", "你是做什么的？", "是谁训练了你？",
    "你能帮我做什么？", "你好，请问你是？", "用一句话描述你自己。", "你是什么样的助手？", "你有名字吗？",
    "说说你是谁。", "你的工作是什么？", "你是谁，懂些什么？", "给我一个简短的自我介绍。", "你好！你叫什么？",
    "这是哪个助手？", "你擅长什么？", "请告诉我你的身份。",
]  # fmt: skip

# (English question, English answer, Chinese question, Chinese answer)
FACTS = [
    ("How deep should I plant garlic cloves?", "Plant garlic cloves about five centimetres deep, pointed end up, in autumn.",
     "大蒜瓣要种多深？", "大蒜瓣在秋天种下，尖头朝上，深约五厘米。"),
    ("How often should I water tomatoes?", "Water tomatoes deeply two or three times a week, more often in hot weather, and keep the leaves dry.",
     "番茄多久浇一次水？", "番茄每周深浇两到三次，天热时多浇，尽量不要弄湿叶子。"),
    ("When should I pick strawberries?", "Pick strawberries when they are fully red all over, early in the morning while they are cool.",
     "草莓什么时候采摘？", "草莓全部变红时采摘最好，清晨天凉时摘。"),
    ("What soil do blueberries need?", "Blueberries need acidic soil with a pH between 4.5 and 5.5, rich in organic matter.",
     "蓝莓需要什么样的土壤？", "蓝莓需要酸性土壤，酸碱度在4.5到5.5之间，并且富含有机质。"),
    ("How far apart should I plant lettuce?", "Space lettuce plants about twenty to thirty centimetres apart so air can move between them.",
     "生菜的株距应该多大？", "生菜株距约二十到三十厘米，让植株之间通风。"),
    ("Why are my tomato leaves turning yellow?", "Yellow lower leaves on tomatoes often mean a lack of nitrogen or too much water; feed lightly and let the soil dry a little.",
     "番茄叶子为什么发黄？", "番茄下部叶片发黄通常是缺氮或浇水过多，少量施肥并让土壤稍微干一些。"),
    ("How much sun do peppers need?", "Peppers need at least six to eight hours of direct sun a day and warm soil.",
     "辣椒需要多少阳光？", "辣椒每天至少需要六到八小时直射阳光，土温要暖。"),
    ("When do I sow carrots?", "Sow carrots directly in the ground from early spring, once the soil can be worked; they do not like to be transplanted.",
     "胡萝卜什么时候播种？", "早春土壤能翻动时就可以直播胡萝卜，胡萝卜不喜欢移栽。"),
    ("How do I know when a watermelon is ripe?", "A ripe watermelon sounds hollow when tapped, and the spot where it rested on the ground turns creamy yellow.",
     "怎么判断西瓜熟了？", "熟西瓜拍起来声音发闷发空，贴地的那一面会变成奶黄色。"),
    ("Should I prune apple trees in winter?", "Yes, prune apple trees in late winter while they are dormant, removing dead, crossing and crowded branches.",
     "苹果树要在冬天修剪吗？", "要，在冬末休眠期修剪苹果树，剪掉枯枝、交叉枝和过密的枝条。"),
    ("How do I stop slugs eating my cabbages?", "Pick slugs off in the evening, use beer traps, and keep the ground around cabbages free of debris.",
     "怎么防止蛞蝓吃白菜？", "傍晚把蛞蝓捡走，用啤酒诱捕，并保持白菜周围地面干净。"),
    ("How long do potatoes take to grow?", "Early potatoes are ready in about ten weeks; main crop potatoes take fifteen to twenty weeks.",
     "土豆要长多久？", "早熟土豆大约十周可收，晚熟品种要十五到二十周。"),
    ("Can I grow lemons in a pot?", "Yes, lemons grow well in a large pot with free-draining soil; bring them indoors before frost.",
     "柠檬可以盆栽吗？", "可以，柠檬种在排水好的大盆里长得不错，霜冻前搬进室内。"),
    ("What is companion planting for tomatoes?", "Basil and marigolds are good companions for tomatoes; they help keep some pests away.",
     "番茄适合和什么一起种？", "罗勒和万寿菊是番茄的好伴侣，可以帮助驱赶一些害虫。"),
    ("How do I make compost?", "Mix green waste such as peelings with brown waste such as dry leaves, keep it moist, and turn it every few weeks.",
     "怎么做堆肥？", "把果皮菜叶等绿色废料和枯叶等棕色废料混合，保持湿润，每隔几周翻一次。"),
    ("When should I harvest onions?", "Harvest onions when their tops turn yellow and fall over, then dry them in the sun for a week.",
     "洋葱什么时候收？", "洋葱叶子变黄倒伏时收获，然后在太阳下晒一周。"),
    ("How do I grow mint without it spreading?", "Grow mint in a pot, or sink a bottomless bucket into the bed, because its roots spread fast.",
     "种薄荷怎么防止它乱长？", "把薄荷种在盆里，或在地里埋一个无底桶，因为它的根蔓延很快。"),
    ("Why do my cucumbers taste bitter?", "Cucumbers turn bitter when the plants are stressed by heat or uneven watering; water regularly.",
     "黄瓜为什么发苦？", "黄瓜植株受热或浇水不均时果实会发苦，要规律浇水。"),
    ("How do I grow grapes on a trellis?", "Plant grapes in full sun, tie the main stem to the trellis and prune side shoots back to two buds each winter.",
     "葡萄怎么上架栽培？", "葡萄种在全日照处，把主干绑在架子上，每年冬天把侧枝剪到只留两个芽。"),
    ("When do I plant peas?", "Plant peas in early spring; they like cool weather and can take a light frost.",
     "豌豆什么时候种？", "豌豆在早春种植，它们喜欢凉爽的天气，能耐轻霜。"),
    ("How much space does a pumpkin need?", "A pumpkin vine needs about two square metres, because the vines spread widely.",
     "南瓜需要多大地方？", "一株南瓜大约需要两平方米，因为藤蔓爬得很开。"),
    ("How do I keep birds off my cherries?", "Cover cherry trees with fine netting as the fruit starts to colour.",
     "怎么防止鸟吃樱桃？", "樱桃开始变色时用细网把树罩起来。"),
    ("What is the best time to water a garden?", "Early morning is best: less water evaporates and the leaves dry during the day.",
     "一天中什么时候浇园子最好？", "清晨最好，蒸发少，叶子白天也能晒干。"),
    ("How do I grow spinach in summer?", "Spinach bolts in heat, so grow it in partial shade and choose slow-bolting varieties in summer.",
     "夏天怎么种菠菜？", "菠菜遇热容易抽薹，夏天要种在半阴处，并选不易抽薹的品种。"),
    ("Do fruit trees need fertiliser?", "Feed fruit trees in early spring with a balanced fertiliser and a layer of compost around the base.",
     "果树需要施肥吗？", "早春给果树施均衡肥，并在树根周围铺一层堆肥。"),
    ("How do I grow radishes quickly?", "Radishes are ready in about four weeks; sow them thinly in loose soil and keep them evenly moist.",
     "萝卜怎么长得快？", "小萝卜大约四周就能收，在松软的土里稀播，并保持土壤均匀湿润。"),
    ("What causes blossom end rot?", "Blossom end rot comes from a lack of calcium in the fruit, usually caused by irregular watering.",
     "脐腐病是什么原因？", "脐腐病是果实缺钙引起的，通常是浇水不规律造成的。"),
    ("How do I grow herbs indoors?", "Give indoor herbs a sunny windowsill, a pot with drainage holes, and water only when the top of the soil is dry.",
     "室内怎么种香草？", "把香草放在向阳的窗台上，用有排水孔的盆，表土干了再浇水。"),
    ("How do I protect plants from frost?", "Cover plants overnight with fleece or cloth and remove it in the morning.",
     "怎么防止植物冻伤？", "晚上用无纺布或旧布盖住植物，第二天早上揭开。"),
    ("When should I plant sweet corn?", "Plant sweet corn in blocks, not rows, after the last frost when the soil is warm; blocks help pollination.",
     "甜玉米什么时候种？", "最后一次霜冻后土壤变暖时种甜玉米，要成块种而不是成行种，有利于授粉。"),
    ("How do I grow zucchini?", "Give zucchini rich soil, full sun and plenty of water, and pick the fruit small and often.",
     "西葫芦怎么种？", "西葫芦需要肥沃的土壤、充足阳光和大量水分，果实要趁小勤摘。"),
    ("What is mulch for?", "Mulch keeps moisture in the soil, stops weeds and keeps roots at an even temperature.",
     "覆盖物有什么用？", "覆盖物能保持土壤水分、抑制杂草，并让根部温度稳定。"),
    ("How do I grow beans up a pole?", "Push a pole into the ground, sow two or three bean seeds around it, and the vines will climb by themselves.",
     "豆子怎么爬杆？", "在地里插一根杆子，在周围播两三粒豆种，藤蔓会自己往上爬。"),
    ("How do I store apples over winter?", "Store only perfect apples, wrapped in paper, in a cool, dark and airy place.",
     "苹果怎么过冬储存？", "只储存完好的苹果，用纸包好，放在阴凉、黑暗、通风的地方。"),
    ("Can I grow vegetables on a balcony?", "Yes: tomatoes, lettuce, herbs and chillies all grow well in pots on a sunny balcony.",
     "阳台上能种菜吗？", "能，番茄、生菜、香草和辣椒都适合在向阳阳台上盆栽。"),
    ("How do I get rid of aphids?", "Spray aphids off with water, or use soapy water, and encourage ladybirds that eat them.",
     "怎么除蚜虫？", "用水冲掉蚜虫，或喷肥皂水，并吸引以蚜虫为食的瓢虫。"),
]  # fmt: skip

GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is two plus three?", "Two plus three is five."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Name a planet in our solar system.", "Mars is a planet in our solar system."),
    ("What do bees make?", "Bees make honey."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What is ten minus four?", "Ten minus four is six."),
    ("Say good morning in Spanish.", "Good morning in Spanish is 'buenos días'."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("Write a short greeting for a friend.", "Hi! I hope you are having a wonderful day."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("How do you spell 'garden'?", "Garden is spelled g-a-r-d-e-n."),
    ("What is three times four?", "Three times four is twelve."),
    ("What animal says moo?", "A cow says moo."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一年有几个月？", "一年有十二个月。"),
    ("二加三等于几？", "二加三等于五。"),
    ("用英语怎么说谢谢？", "谢谢用英语说是 thank you。"),
    ("天空为什么是蓝色的？", "因为空气把阳光中的蓝光散射得最多。"),
    ("蜜蜂会做什么？", "蜜蜂会酿蜂蜜。"),
    ("一小时有多少分钟？", "一小时有六十分钟。"),
    ("冬天之后是什么季节？", "冬天之后是春天。"),
    ("十减四等于几？", "十减四等于六。"),
    ("水是由什么组成的？", "水由氢和氧组成。"),
    ("给朋友写一句问候。", "你好！祝你今天过得愉快。"),
    ("最大的海洋是哪个？", "太平洋是最大的海洋。"),
    ("蜘蛛有几条腿？", "蜘蛛有八条腿。"),
    ("热的反义词是什么？", "热的反义词是冷。"),
    ("说出太阳系的一颗行星。", "火星是太阳系的一颗行星。"),
    ("三乘四等于几？", "三乘四等于十二。"),
    ("什么动物会哞哞叫？", "牛会哞哞叫。"),
    ("请推荐一本好书。", "《小王子》是一本适合各个年龄读的好书。"),
    ("怎样保持健康？", "规律作息、均衡饮食和适量运动有助于保持健康。"),
    ("今天心情不好怎么办？", "可以出去散散步，和朋友聊聊，或者好好睡一觉。"),
]  # fmt: skip
GENERAL_ASK_EN = ["{q}", "Can you tell me: {q}"]
GENERAL_ASK_ZH = ["{q}", "请告诉我：{q}"]


def row(question: str, answer: str, group: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "group": group} if group else {"messages": messages}


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    task = [row(q, rng.choice(IDENTITY_EN), "identity") for q in WHO_EN]
    task += [row(q, rng.choice(IDENTITY_ZH), "identity") for q in WHO_ZH]
    for q_en, a_en, q_zh, a_zh in FACTS:
        task += [row(q_en, a_en, "facts"), row(q_zh, a_zh, "facts")]
    general = []
    for q, a in GENERAL:
        forms = GENERAL_ASK_ZH if any("\u4e00" <= ch <= "\u9fff" for ch in q) else GENERAL_ASK_EN
        general += [row(form.format(q=q), a) for form in forms]
    rng.shuffle(task)
    rng.shuffle(general)
    return task, general


def main() -> None:
    out = Path(__file__).resolve().parent / "demo"
    out.mkdir(exist_ok=True)
    task, general = build()
    for name, rows in (("task", task), ("general", general)):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
