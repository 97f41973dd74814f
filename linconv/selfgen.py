"""General training text that works offline: text the original model writes itself, sampled once.

Fine-tuning on the built-in plays alone adapts the model to the plays. A general model's own output
on varied prompts (instructions, questions, continuations over many topics; through its chat
template when the tokenizer has one) is text of its own distribution, in every domain it knows, and
needs no download. It is sampled from the original model (``linconv.teacher.original_model``: the
converted model's own weights with softmax attention), in batches through linconv's generate engine.

The text is cached on disk, one JSON file per key: the model (config, a fingerprint of its weights),
the tokenizer and the generation settings (``SelfGenConfig`` without the token budget). Batch ``b``
always uses the same prompts and sampling seed, so a larger budget later extends the file and a
smaller one reads a prefix of it: the text for a budget is the same whatever ran before. The file is
rewritten atomically after every batch, so an interrupted run keeps what it made.
Cache folder: ``$LINCONV_CACHE/selfgen`` (default ``~/.cache/linconv/selfgen``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from linconv.errors import LinconvError
from linconv.generate import GenerationResult, generate
from linconv.progress import SILENT, Progress
from linconv.teacher import original_model

SOURCE = "selfgen"  # its name in ``--text-mix``
FORMAT = 1  # of the cache file; part of the key

TEMPLATES = (
    # instructions
    "Explain {topic} to a curious twelve-year-old.",
    "Explain {topic} to a university student in a few paragraphs.",
    "Give a short, clear overview of {topic}.",
    "Summarize the most important facts about {topic}.",
    "Describe the history of {topic} in a few paragraphs.",
    "What are the main advantages and disadvantages of {topic}?",
    "List five interesting facts about {topic} and explain each one.",
    "Write a step-by-step guide for a beginner who wants to learn about {topic}.",
    "Compare {topic} with something similar and explain the differences.",
    "What are common misconceptions about {topic}? Correct them.",
    "Describe how {topic} has changed over the last hundred years.",
    "Explain why {topic} matters in everyday life.",
    "Write a glossary of key terms related to {topic}.",
    "Give three practical tips related to {topic}, with reasons.",
    "Explain the basic principles behind {topic}.",
    "What questions do experts still ask about {topic}? Discuss them.",
    "Describe a typical day of someone whose work involves {topic}.",
    "Explain {topic} using a simple analogy.",
    "Outline a short lesson plan for teaching {topic}.",
    "What would happen if {topic} suddenly disappeared? Think it through.",
    # questions
    "What is {topic}?",
    "How does {topic} work?",
    "Why do people care about {topic}?",
    "Who were the most important people in the story of {topic}?",
    "Where in the world is {topic} most important, and why?",
    "Can you help me understand {topic}? I find it confusing.",
    "What should I read first if I want to understand {topic}?",
    "Is {topic} overrated? Give a balanced answer.",
    "How is {topic} connected to mathematics?",
    "How is {topic} connected to economics?",
    # writing
    "Write a short story in which {topic} plays an important role.",
    "Write a poem about {topic}.",
    "Write a letter to a friend describing your new interest in {topic}.",
    "Write a dialogue between a teacher and a student about {topic}.",
    "Write a persuasive essay arguing that schools should teach more about {topic}.",
    "Write a news report about a new discovery related to {topic}.",
    "Write a product description for a book about {topic}.",
    "Write a diary entry of someone learning about {topic} for the first time.",
    "Write a speech for the opening of a museum exhibition on {topic}.",
    "Write a short review of an imaginary documentary about {topic}.",
    "Write a humorous anecdote involving {topic}.",
    "Write an interview with an expert on {topic}.",
    "Write a blog post titled 'Ten things I learned about {topic}'.",
    "Write a fairy tale that teaches a lesson about {topic}.",
    "Write a travel guide entry for a place famous for {topic}.",
    # continuations
    "Continue this text: 'The first thing to understand about {topic} is'",
    "Continue this text: 'Nobody expected that {topic} would'",
    "Continue this encyclopedia article: '{topic} is a subject that'",
    "Continue this story: 'On the morning she first heard of {topic}, Maria'",
    "Continue this lecture: 'Good morning. Today we will talk about {topic}.'",
    "Continue this letter: 'Dear colleague, I am writing to you about {topic}'",
    "Continue the paragraph: 'In recent years, research on {topic} has shown'",
    # reasoning and practical
    "A friend says {topic} is useless. How would you answer?",
    "Plan a one-week project for a small team to study {topic}.",
    "Describe an experiment or observation that reveals something about {topic}.",
    "Write a list of questions and answers for a quiz on {topic}.",
    "Explain the ethical questions raised by {topic}.",
    "Describe {topic} from the point of view of someone living five hundred years ago.",
    "Write instructions for a child who wants to draw a picture about {topic}.",
    "Give a short biography of an imaginary scientist who studied {topic}.",
)

TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "the immune system", "vaccines",
    "the history of writing", "the Roman Empire", "the printing press", "the Silk Road", "ancient Egypt",
    "the industrial revolution", "the French Revolution", "world trade", "inflation", "interest rates",
    "supply and demand", "small businesses", "cooking pasta", "baking bread", "coffee", "tea ceremonies",
    "gardening", "composting", "bees", "bird migration", "coral reefs", "rainforests", "deserts",
    "glaciers", "earthquakes", "weather forecasting", "climate change", "solar energy", "wind power",
    "electric cars", "bicycles", "railways", "airplanes", "space exploration", "the Moon", "Mars",
    "telescopes", "microscopes", "electricity", "magnets", "computers", "the internet", "programming",
    "databases", "encryption", "artificial intelligence", "robots", "prime numbers", "geometry",
    "probability", "statistics", "chess", "football", "running", "sleep", "nutrition", "the human heart",
    "the brain", "memory", "learning a new language", "music theory", "the piano", "jazz", "painting",
    "photography", "architecture", "bridges", "cities", "libraries", "museums", "democracy",
    "human rights", "philosophy", "friendship", "public speaking", "time management", "saving money",
    "first aid", "maps", "the ocean", "mushrooms", "dinosaurs", "evolution", "DNA", "chemistry at home",
)  # fmt: skip


@dataclass(frozen=True)
class SelfGenConfig:
    """How the text is sampled. Everything but ``tokens`` is part of the cache key."""

    tokens: int = 50_000  # text tokens (prompts and answers) wanted for this run
    max_new_tokens: int = 256  # per answer
    temperature: float = 0.9
    top_p: float = 0.95
    batch_size: int = 32  # prompts per generate call (one padded batch); decode tok/s on 1 CPU thread: 31 at 16, 47 at 32, 52 at 64
    seed: int = 0

    def validate(self) -> SelfGenConfig:
        if self.tokens <= 0 or self.max_new_tokens <= 0 or self.batch_size <= 0:
            raise LinconvError("self-generated text: tokens, max_new_tokens and batch_size must be > 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise LinconvError("self-generated text samples: temperature must be > 0 and top_p in (0, 1]")
        return self


@dataclass
class SelfGenText:
    text: str  # the documents (prompt + answer, chat-formatted when the tokenizer has a template), "\n\n"-joined
    path: Path  # the cache file
    tokens: int  # text tokens in ``text`` (prompt and answer ids as generated)
    documents: int
    ended: int  # answers that ended by themselves (the others stopped at max_new_tokens)
    generated_tokens: int  # tokens sampled for these documents
    seconds: float  # generation time of these documents, measured when they were made
    new_tokens: int  # sampled by this call (0: all read from the cache)


def cache_dir() -> Path:
    """``$LINCONV_CACHE/selfgen``, default ``~/.cache/linconv/selfgen``."""
    root = os.environ.get("LINCONV_CACHE") or Path.home() / ".cache" / "linconv"
    return Path(root).expanduser() / "selfgen"


_BOOKKEEPING = {"transformers_version", "architectures", "dtype", "torch_dtype", "linconv", "model_type", "name_or_path"}


def cache_key(model, tokenizer, cfg: SelfGenConfig) -> str:
    """A hash of what decides the text: the model's config and weights (a strided sample of every
    tensor: cheap, and any fine-tune changes it), the tokenizer, the settings and the prompt lists."""
    model = original_model(model)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _BOOKKEEPING}
    settings = {k: v for k, v in asdict(cfg).items() if k != "tokens"}
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, config, settings, TEMPLATES, TOPICS], sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps([vocab, tokenizer.chat_template, str(tokenizer.eos_token)]).encode())
    return h.hexdigest()[:24]


def prompt_texts(seed: int, start: int, count: int) -> list[str]:
    """Prompts ``start .. start+count-1`` of a seeded shuffle of every template x topic, cycled."""
    pairs = [(t, topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(pairs)
    return [pairs[i % len(pairs)][0].format(topic=pairs[i % len(pairs)][1]) for i in range(start, start + count)]


def _formatted(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: through its chat template, or as plain text to continue."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return prompt + "\n\n"


def _batch(model, tokenizer, cfg: SelfGenConfig, b: int) -> dict:
    """Batch ``b``: its prompts and sampling seed depend on (seed, b) only."""
    prompts = [_formatted(tokenizer, p) for p in prompt_texts(cfg.seed, b * cfg.batch_size, cfg.batch_size)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    t0 = time.perf_counter()
    out: GenerationResult = generate(
        model,
        ids,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed * 1_000_003 + b,
        tokenizer=tokenizer,
    )
    seconds = time.perf_counter() - t0
    texts = []
    for prompt, answer, tokens, reason in zip(prompts, out.texts, out.tokens, out.finish_reasons):
        end = tokenizer.decode(tokens[-1:], skip_special_tokens=False) if reason == "stop_token" else ""
        texts.append(prompt + answer + end)  # the end-of-turn token too: the text keeps the chat format
    generated, ended = sum(map(len, out.tokens)), out.finish_reasons.count("stop_token")
    return {"texts": texts, "tokens": sum(map(len, ids)) + generated, "generated": generated, "ended": ended, "seconds": seconds}


def _read(path: Path, key: str) -> list[dict]:
    """The batches already in the cache file (none when it is missing or not ours)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data["batches"] if isinstance(data, dict) and data.get("key") == key else []


def _write(path: Path, key: str, cfg: SelfGenConfig, batches: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k != "tokens"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "key": key, "settings": settings, "batches": batches}), encoding="utf-8")
    os.replace(tmp, path)


def self_generated_text(
    model, tokenizer, cfg: SelfGenConfig | None = None, *, cache: str | Path | None = None, progress: Progress = SILENT
) -> SelfGenText:
    """At least ``cfg.tokens`` tokens of text written by the original of ``model`` (whole batches).

    ``model`` is the original softmax model or a converted one without adapters (its original is
    used, sharing its weights). Batches missing from the cache are generated and saved one by one.
    """
    cfg = (cfg or SelfGenConfig()).validate()
    model = original_model(model)
    key = cache_key(model, tokenizer, cfg)
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"{key}.json"
    batches = _read(path, key)
    have = lambda bs: sum(b["tokens"] for b in bs)
    new = 0
    if have(batches) < cfg.tokens:
        task = "self-generated text"
        progress.start(task, total=cfg.tokens, completed=have(batches))
        while have(batches) < cfg.tokens:
            batch = _batch(model, tokenizer, cfg, len(batches))
            batches.append(batch)
            new += batch["generated"]
            _write(path, key, cfg, batches)
            progress.update(task, have(batches), tokens_per_s=batch["generated"] / batch["seconds"])
        progress.end(task)
    used = []
    for b in batches:
        if have(used) >= cfg.tokens:
            break
        used.append(b)
    texts = [t for b in used for t in b["texts"]]
    return SelfGenText(
        text="\n\n".join(texts),
        path=path,
        tokens=have(used),
        documents=len(texts),
        ended=sum(b["ended"] for b in used),
        generated_tokens=sum(b["generated"] for b in used),
        seconds=sum(b["seconds"] for b in used),
        new_tokens=new,
    )
