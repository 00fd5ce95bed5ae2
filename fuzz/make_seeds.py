#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (standard library only).

Seeds are small valid (and a few nearly valid) inputs, so that mutations
start deep inside each format. The swap-record and JPEG seeds need the
project's own encoders; `cargo test -p qvl-runtime --test
reliability_fuzz_corpus -- --ignored write_generated_seeds` writes those.
Re-running is idempotent: files are named by content.
"""
import hashlib, json, os, shutil, struct, zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data, name=None):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = name or "seed-" + hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- GGUF -------------------------------------------------------------------
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(t, v):
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    if t == 8:
        return gstr(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, i) for i in items)
    return struct.pack(fmt[t], v)


def gguf(kv, tensors, alignment=32, version=3):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for k, t, v in kv:
        out += gstr(k) + struct.pack("<I", t) + gval(t, v)
    offs, off = [], 0
    for name, dims, ty, data in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
        offs.append(off)
        off = -(-(off + len(data)) // alignment) * alignment
    start = -(-len(out) // alignment) * alignment
    out = out.ljust(start, b"\0")
    for (name, dims, ty, data), o in zip(tensors, offs):
        out = out.ljust(start + o, b"\0") + data
    return out


def q8_0(nblocks):
    return b"".join(struct.pack("<e", 0.05 * (i + 1)) + bytes((j * 7 + i) % 256 for j in range(32)) for i in range(nblocks))


def q4_0(nblocks):
    return b"".join(struct.pack("<e", 0.1) + bytes((j * 13 + i) % 256 for j in range(16)) for i in range(nblocks))


def q4_1(nblocks):
    return b"".join(struct.pack("<ee", 0.1, -0.5) + bytes((j * 5 + i) % 256 for j in range(16)) for i in range(nblocks))


def f32(n):
    return b"".join(struct.pack("<f", (i % 17) * 0.25 - 2) for i in range(n))


def f16(n):
    return b"".join(struct.pack("<e", (i % 9) * 0.5 - 2) for i in range(n))


tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "H", "e", "l", "o", ",", "Ġ", "w", "r", "d", "!", "He", "ll", "Hell", "Hello", "Ġw", "or", "ld", "Ġworld", "\n", "1", "2", "3"]
merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld"]
llama_kv = [
    ("general.architecture", 8, "llama"),
    ("general.name", 8, "fuzz-tiny"),
    ("general.alignment", 4, 32),
    ("llama.context_length", 4, 64),
    ("llama.embedding_length", 4, 32),
    ("llama.block_count", 4, 1),
    ("llama.feed_forward_length", 4, 64),
    ("llama.attention.head_count", 4, 4),
    ("llama.attention.head_count_kv", 4, 2),
    ("llama.rope.freq_base", 6, 10000.0),
    ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
    ("llama.vocab_size", 4, len(tokens)),
    ("tokenizer.ggml.model", 8, "gpt2"),
    ("tokenizer.ggml.pre", 8, "smollm"),
    ("tokenizer.ggml.tokens", 9, (8, tokens)),
    ("tokenizer.ggml.token_type", 9, (5, [3, 3, 3, 3, 3] + [1] * (len(tokens) - 5))),
    ("tokenizer.ggml.merges", 9, (8, merges)),
    ("tokenizer.ggml.bos_token_id", 4, 1),
    ("tokenizer.ggml.eos_token_id", 4, 4),
    ("tokenizer.ggml.add_bos_token", 7, False),
    ("tokenizer.chat_template", 8, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"),
]
tensors = [
    ("token_embd.weight", [32, len(tokens)], 8, q8_0(len(tokens))),
    ("blk.0.attn_q.weight", [32, 32], 2, q4_0(32)),
    ("blk.0.attn_k.weight", [32, 16], 3, q4_1(16)),
    ("blk.0.attn_norm.weight", [32], 0, f32(32)),
    ("output_norm.weight", [32], 1, f16(32)),
]
put("gguf", gguf(llama_kv, tensors))
put("gguf", gguf(llama_kv[:3], tensors[3:], version=2))
put("gguf", gguf([("a", t, v) for t, v in [(0, 1), (1, -1), (2, 2), (3, -2), (4, 3), (5, -3), (6, 1.5), (7, True), (8, "x"), (10, 5), (11, -5), (12, 2.5)]] + [("nested", 9, (9, [(4, [1, 2]), (4, [])]))], []))
put("gguf", gguf([], [("t", [256], 12, bytes(144)), ("u", [256], 14, bytes(210))], alignment=32))
put("gguf", gguf([("general.alignment", 4, 64)], [("t", [32, 2], 8, q8_0(2))], alignment=64))
put("gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))

# --- safetensors ------------------------------------------------------------
def safetensors(entries, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h = h.ljust(-(-len(h) // 8) * 8, b" ")
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", safetensors([("a.weight", "F32", [2, 3], f32(6)), ("b", "F16", [4], f16(4)), ("c", "BF16", [2], b"\x80\x3f\x00\x40"), ("d", "I64", [1], struct.pack("<q", 7)), ("e", "U8", [3], b"abc")], {"format": "pt"}))
put("safetensors", safetensors([]))
put("safetensors", safetensors([("scalar", "F32", [], f32(1)), ("empty", "F32", [0, 4], b"")]))
tiny = os.path.join(ROOT, "crates/qvl-model/tests/data/images/images.safetensors")
if os.path.exists(tiny) and os.path.getsize(tiny) < 200_000:
    put("safetensors", open(tiny, "rb").read())

# --- config TOML ----------------------------------------------------------
for f in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if f.endswith(".toml"):
        put("config_toml", open(os.path.join(ROOT, "configs", f), "rb").read())
put("config_toml", "")
put("config_toml", '[pool]\nmax_pool_size = "4GiB"\n[swapping]\nenabled = true\nswap_directory = "/tmp/qvl-fuzz-swap"\nmax_swap_size = "1GiB"\n[gc]\ninterval = "250ms"\n')
put("config_toml", '[caching]\ngpu_cache_size = "0B"\ncpu_cache_size = "512MiB"\neviction_policy = "lru"\n[compression]\nmethod = "zstd"\n[hardware]\ndevice = "cpu"\n')

# --- trace JSONL ------------------------------------------------------------
trace = os.path.join(ROOT, "data/traces/mooncake_conversation_trace.jsonl")
with open(trace) as f:
    lines = [next(f) for _ in range(40)]
put("trace_jsonl", "".join(lines[:12]))
put("trace_jsonl", "".join(lines[12:40]))
put("trace_jsonl", '{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": []}\n\n{"timestamp": 6, "input_length": 600, "output_length": 2, "hash_ids": [1, 2]}\n')
put("trace_jsonl", "0.1,0.5,1%,200\n")

# --- images (PNG; JPEG comes from the Rust writer) ----------------------------
def png(w, h, color_type, bit_depth, rows, interlace=0, extra=b""):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, interlace)
    raw = b"".join(b"\0" + r for r in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


put("image", png(8, 4, 2, 8, [bytes((x * 30 + y * 50 + c * 80) % 256 for x in range(8) for c in range(3)) for y in range(4)]))
put("image", png(5, 3, 6, 8, [bytes((x * 40 + c * 60 + y) % 256 if c < 3 else 128 for x in range(5) for c in range(4)) for y in range(3)]))
put("image", png(4, 4, 0, 8, [bytes(range(y * 4, y * 4 + 4)) for y in range(4)]))
put("image", png(3, 2, 3, 8, [bytes([0, 1, 2]), bytes([2, 1, 0])], extra=b"\0\0\0\x09PLTE" + bytes([255, 0, 0, 0, 255, 0, 0, 0, 255]) + struct.pack(">I", zlib.crc32(b"PLTE" + bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])) & 0xFFFFFFFF)))
put("image", png(4, 2, 2, 16, [bytes((x * 7) % 256 for x in range(24)) for _ in range(2)]))
put("image", png(6, 6, 2, 8, [bytes((x + y) % 256 for x in range(18)) for y in range(6)], interlace=1))

# --- tokenizer.json ---------------------------------------------------------
tj = os.path.join(ROOT, "crates/qvl-model/tests/data/smollm2/hf_tokenizer_json")
for sub in sorted(os.listdir(tj)):
    p = os.path.join(tj, sub, "tokenizer.json")
    if os.path.exists(p):
        put("tokenizer_json", open(p, "rb").read())

# --- model config.json ------------------------------------------------------
put("model_config_json", open(os.path.join(ROOT, "crates/qvl-model/tests/data/qwen3vl-tiny/config.json"), "rb").read())
put("model_config_json", json.dumps({"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098}))
put("model_config_json", json.dumps({"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 14}))
print("seeds written under", CORPUS)
for t in sorted(os.listdir(CORPUS)):
    print(t, len(os.listdir(os.path.join(CORPUS, t))))
