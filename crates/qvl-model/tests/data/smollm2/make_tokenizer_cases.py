"""Token ids of varied texts from the Hugging Face `tokenizers` library, built from the SmolLM2
GGUF metadata the way transformers' GGUFLlamaConverter does. Run: python make_tokenizer_cases.py GGUF OUT.json"""
import json, struct, sys
from tokenizers import Tokenizer, AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
d = open(sys.argv[1], 'rb').read(3_000_000)
p = 24
def rd(f):
    global p; v = struct.unpack_from('<' + f, d, p); p += struct.calcsize('<' + f); return v[0]
def rs():
    global p; n = rd('Q'); s = d[p:p + n]; p += n; return s.decode()
sc = {0:'B',1:'b',2:'H',3:'h',4:'I',5:'i',6:'f',7:'?',10:'Q',11:'q',12:'d'}
def rv(t):
    if t in sc: return rd(sc[t])
    if t == 8: return rs()
    at = rd('I'); n = rd('Q'); return [rv(at) for _ in range(n)]
n_kv = struct.unpack_from('<Q', d, 16)[0]
kv = {}
for _ in range(n_kv):
    k = rs(); t = rd('I'); kv[k] = rv(t)
toks = kv['tokenizer.ggml.tokens']; types = kv['tokenizer.ggml.token_type']
merges = [tuple(m.split(' ')) for m in kv['tokenizer.ggml.merges']]
vocab = {t: i for i, t in enumerate(toks)}
unk = toks[kv['tokenizer.ggml.unknown_token_id']]
tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
tok.add_special_tokens([AddedToken(toks[i], normalized=False, special=True) for i, ty in enumerate(types) if ty == 3])
tok.normalizer = normalizers.Sequence([])
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)])
golden = json.load(open('/work/shared/golden/smollm2/golden.json'))
assert tok.encode(golden['text']).ids == golden['input_ids'], "converter mimic does not reproduce golden"
texts = [
    "Hello, world! I'm here; you're there. We'll see, they've gone, it's done, I'd go.",
    "DON'T SHOUT. It'S mixed Case'S.",
    "Numbers: 0 7 42 123 2024 31415926535 3.14159 1,000,000 -17 +3e10 0x1F",
    "Tabs\tand  double  spaces   triple\n\nnewlines\r\nwindows\n \n  \tmixed   ",
    "   leading spaces and trailing   ",
    "Unicode: café naïve résumé Ünïcödé — “quotes” ‘single’ … ©®™ ½ ¼",
    "日本語のテキスト、中文文本。한국어 텍스트. Русский текст. العربية. עברית. हिन्दी",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦 ❤️ 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n    print(f\"{i}: {f(i)}\")\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "inline<|im_end|>special<|endoftext|>tokens <repo_name> and <|im_start|",
    "URL https://example.com/path?query=1&b=2#frag and email a.b@c.org",
    "!!!??? ... --- ___ *** ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "a" * 300 + " " + "ab" * 100,
    "Mixed\u00a0nbsp and\u2003em space and zero\u200bwidth",
    "",
    " ",
    "\n",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 5,
]
cases = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
for c in cases:
    c["decoded"] = tok.decode(c["ids"], skip_special_tokens=False)
json.dump({"note": "ids from the Hugging Face tokenizers library (0.23) built from the GGUF metadata the way transformers' GGUFLlamaConverter does (ByteLevel regex pre-tokenizer, type-3 tokens special); made by hf_cases.py", "cases": cases}, open(sys.argv[2], 'w'), indent=1, ensure_ascii=False)
print(len(cases), "cases")
