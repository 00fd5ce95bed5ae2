"""Small byte-level BPE tokenizers in the styles of Qwen2/Qwen3, Llama 3 and SmolLM2, trained with
the Hugging Face `tokenizers` library (0.23) and saved as tokenizer.json, plus the ids that library
gives for varied texts (cases.json). They test qvl's tokenizer.json loader against the reference
implementation without shipping multi-megabyte vocabularies.

Run:  python make_cases.py OUT_DIR"""
import json, os, sys
from tokenizers import Tokenizer, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

out = sys.argv[1]
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
corpus = [
    "The library keeps a small amount of memory on the graphics card and moves older blocks of the cache to main memory.",
    "When a request needs those blocks again, they are copied back before the next layer runs. It's fast; they're cheap.",
    "def forward(self, x):\n    return self.proj(x) * 2  # scale\n\nfor i in range(100):\n    print(i, i ** 2)\n",
    "Numbers 0 1 2 3 12 345 6789 2024 3.14159 and prices like $19.99 or 1,000,000 units.",
    "Café, naïve, résumé, Ünïcödé, 日本語のテキスト, 中文文本, 한국어, Русский текст, emoji 🎉🚀.",
] * 20
texts = [
    "Hello, world! I'm here; you're there. We'll see, THEY'VE gone, it's done.",
    "Numbers: 0 7 42 123 2024 31415926535 3.14159 1,000,000 -17",
    "Tabs\tand  double  spaces   triple\n\nnewlines\r\nwindows\n \n  \tmixed   ",
    "Unicode: cafe\u0301 (decomposed) café naïve 日本語 한국어 🎉👍🏽",
    "<|im_start|>user\nDescribe <|vision_start|><|image_pad|><|vision_end|> please.<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "", " ", "\n\n\n", "x",
]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|begin_of_text|>"]

def build(style):
    tok = Tokenizer(BPE(ignore_merges=(style == "llama3")))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok

cases = {}
for style in ["qwen2", "llama3", "smollm2"]:
    tok = build(style)
    os.makedirs(os.path.join(out, style), exist_ok=True)
    tok.save(os.path.join(out, style, "tokenizer.json"))
    cases[style] = [{"text": t, "ids": tok.encode(t).ids, "decoded": tok.decode(tok.encode(t).ids, skip_special_tokens=False)} for t in texts]
json.dump(cases, open(os.path.join(out, "cases.json"), "w"), indent=1, ensure_ascii=False)
print({k: len(v) for k, v in cases.items()})
