"""Tokenizer fertility analysis: how much each tokenizer fragments each source, side by side.

Metrics per (tokenizer, source) and overall:
- chars_per_token, bytes_per_token (UTF-8), tokens_per_char;
- fertility: tokens per whitespace word, or tokens per character for scripts written without spaces
  (Han, kana, Thai, Lao, Khmer, Myanmar, Tibetan) -- `fertility_unit` says which;
- byte_fallback_rate: share of tokens that are not whole characters (SentencePiece `<0xNN>` pieces, or
  byte-level tokens that are not valid UTF-8 on their own); unk_rate: share of unknown-token ids;
- split4_word_share: share of word occurrences cut into >= 4 tokens;
- most_fragmented: the frequent words with the most tokens, with their pieces.
Parallel files (FLORES-200 `eng_Latn.devtest`, `hin_Deva.devtest`, ...) also get the token count
relative to the reference language (English by default).
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.utils import check_text_file

__all__ = ["SourceStats", "analyze", "analyze_text", "render_markdown", "plot_fertility", "language_of"]

_WORD = re.compile(r"\S+")
_NO_SPACE_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")
_FLORES = re.compile(r"^([a-z]{3})_([A-Z][a-z]{3})$")


@dataclasses.dataclass
class SourceStats:
    tokenizer: str
    source: str
    num_chars: int
    num_bytes: int
    num_words: int
    num_tokens: int
    chars_per_token: float
    bytes_per_token: float
    tokens_per_word: float
    fertility: float  # tokens per word, or per char when fertility_unit == "char"
    fertility_unit: str  # "word" or "char"
    byte_fallback_rate: float
    unk_rate: float
    split4_word_share: float
    most_fragmented: list  # [{"word", "count", "tokens", "pieces"}]
    language: str | None = None
    ratio_to_reference: float | None = None  # tokens / reference-language tokens (parallel text)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def language_of(path: str | os.PathLike) -> str | None:
    """FLORES-style language code from a file name: `hin_Deva.devtest` -> "hin"; else None."""
    m = _FLORES.match(Path(path).name.split(".")[0])
    return m.group(1) if m else None


def _no_space_script(text: str) -> bool:
    sample = [c for c in text[:20000] if c.isalpha()]
    if not sample:
        return False
    hits = sum(unicodedata.name(c, "").startswith(_NO_SPACE_SCRIPTS) for c in sample)
    return hits / len(sample) > 0.5


def _partial_ids(tok) -> set[int]:
    """Ids that are byte fallback / partial characters, computed once per tokenizer."""
    cached = getattr(tok, "_cpt_partial_ids", None)
    if cached is not None:
        return cached
    ids = set()
    for piece, i in tok.get_vocab().items():
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            ids.add(i)
        elif "\ufffd" in tok.decode([i], skip_special_tokens=False):
            ids.add(i)
    try:
        tok._cpt_partial_ids = ids
    except AttributeError:
        pass
    return ids


def analyze_text(tok, text: str, *, tokenizer_name: str, source: str, top_k: int = 10,
                 min_word_count: int = 5) -> SourceStats:
    """Statistics of one tokenizer on one text (see module docstring)."""
    lines = text.splitlines(keepends=True) or [""]
    encs = tok.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    partial = _partial_ids(tok)
    unk_id = tok.unk_token_id
    num_tokens = num_partial = num_unk = 0
    word_count: Counter = Counter()
    word_pieces: dict[str, list[int]] = {}
    split4 = 0
    for line, enc in zip(lines, encs):
        ids, offs = enc.ids, enc.offsets
        num_tokens += len(ids)
        num_partial += sum(i in partial for i in ids)
        if unk_id is not None:
            num_unk += sum(i == unk_id and unk_id not in partial for i in ids)
        j = 0
        for m in _WORD.finditer(line):
            start, end = m.span()
            while j < len(offs) and offs[j][1] <= start:
                j += 1
            k = j
            pieces = []
            while k < len(offs) and offs[k][0] < end:
                pieces.append(ids[k])
                k += 1
            w = m.group()
            word_count[w] += 1
            if w not in word_pieces:
                word_pieces[w] = pieces
            split4 += len(pieces) >= 4
    num_words = sum(word_count.values())
    num_chars = len(text)
    num_bytes = len(text.encode("utf-8"))
    per_char = _no_space_script(text)
    frequent = [w for w, c in word_count.most_common() if c >= min_word_count][:5000]
    frequent.sort(key=lambda w: (-len(word_pieces[w]), -word_count[w]))
    most = [
        {"word": w, "count": word_count[w], "tokens": len(word_pieces[w]),
         "pieces": _pieces(tok, word_pieces[w])}
        for w in frequent[:top_k]
    ]
    nt = max(1, num_tokens)
    return SourceStats(
        tokenizer=tokenizer_name,
        source=source,
        num_chars=num_chars,
        num_bytes=num_bytes,
        num_words=num_words,
        num_tokens=num_tokens,
        chars_per_token=num_chars / nt,
        bytes_per_token=num_bytes / nt,
        tokens_per_word=num_tokens / max(1, num_words),
        fertility=num_tokens / max(1, num_chars if per_char else num_words),
        fertility_unit="char" if per_char else "word",
        byte_fallback_rate=num_partial / nt,
        unk_rate=num_unk / nt,
        split4_word_share=split4 / max(1, num_words),
        most_fragmented=most,
        language=None,
    )


def _read(path: Path, max_chars: int | None) -> str:
    check_text_file(path, "input", hint="give plain-text files")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(max_chars) if max_chars else f.read()


def _named(specs: list[str]) -> list[tuple[str, str]]:
    """[(column name, tokenizer path)]: `NAME=PATH` keeps NAME; else the shortest path tail that is unique."""
    pairs = []
    for s in specs:
        name, sep, path = s.partition("=")
        if sep and name and "/" not in name and not Path(s).exists():
            pairs.append((name, path))
        else:
            pairs.append((None, s))
    paths = [Path(p).resolve().parts for n, p in pairs if n is None]
    out = []
    for name, spec in pairs:
        if name is None:
            parts = Path(spec).resolve().parts
            generic = parts[-1] in ("tokenizer", "tokenizer.json", "tokenizer.model", "data")  # name its parent too
            for k in range(1 + generic, len(parts) + 1):
                tail = str(Path(*parts[-k:]))
                if sum(q[-k:] == parts[-k:] for q in paths) == 1:
                    break
            name = tail
        if name in [n for n, _ in out]:
            name = f"{name} ({spec})"
        out.append((name, spec))
    return out


def analyze(tokenizers: list[str | os.PathLike], inputs: list[str | os.PathLike], *,
            reference_lang: str | None = None, max_chars: int | None = 2_000_000,
            out_dir: str | os.PathLike | None = None) -> dict:
    """Analyze every tokenizer on every input; returns a JSON-able report.

    `reference_lang` (e.g. "eng"): the FLORES-style file of that language is the parallel reference;
    None: "eng" when an `eng_*` file is among the inputs. With `out_dir`: report.json, report.md and
    fertility.png are written there.
    """
    from cpt_megatron.tokenizer.load import load_tokenizer
    from cpt_megatron.utils import write_json

    if not tokenizers:
        raise CptError("give at least one --tokenizer")
    if not inputs:
        raise CptError("give at least one --input file")
    texts = {str(p): _read(Path(p), max_chars) for p in inputs}
    langs = {src: language_of(src) for src in texts}
    if reference_lang is None and "eng" in langs.values():
        reference_lang = "eng"
    if reference_lang is not None and reference_lang not in langs.values():
        raise CptError(
            f"reference language {reference_lang!r} has no input file (expected a FLORES-style "
            f"{reference_lang}_Xxxx.* file among --input)"
        )
    named = _named([str(t) for t in tokenizers])
    names = [n for n, _ in named]
    rows: list[SourceStats] = []
    overall = []
    for name, spec in named:
        tok = load_tokenizer(spec)
        per = [analyze_text(tok, text, tokenizer_name=name, source=Path(src).name)
               for src, text in texts.items()]
        for st, src in zip(per, texts):
            st.language = langs[src]
        if reference_lang is not None:
            ref = next(st for st, src in zip(per, texts) if langs[src] == reference_lang)
            for st in per:
                if st.language is not None:
                    st.ratio_to_reference = st.num_tokens / max(1, ref.num_tokens)
        rows += per
        tot_t = sum(s.num_tokens for s in per)
        tot_c = sum(s.num_chars for s in per)
        tot_w = sum(s.num_words for s in per)
        overall.append({
            "tokenizer": name, "spec": str(spec), "vocab_size": len(tok), "num_tokens": tot_t,
            "chars_per_token": tot_c / max(1, tot_t),
            "bytes_per_token": sum(s.num_bytes for s in per) / max(1, tot_t),
            "tokens_per_word": tot_t / max(1, tot_w),
            "byte_fallback_rate": sum(s.byte_fallback_rate * s.num_tokens for s in per) / max(1, tot_t),
            "split4_word_share": sum(s.split4_word_share * s.num_words for s in per) / max(1, tot_w),
        })
    report = {
        "tokenizers": names,
        "sources": [Path(s).name for s in texts],
        "reference_lang": reference_lang,
        "max_chars": max_chars,
        "overall": overall,
        "per_source": [r.to_dict() for r in rows],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
        plot_fertility(report, out / "fertility.png")
        report["files"] = [str(out / n) for n in ("report.json", "report.md", "fertility.png")]
    return report


def _cell(stats: dict, key: str) -> str:
    v = stats.get(key)
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def render_markdown(report: dict) -> str:
    """Short markdown: one table per metric, sources as rows and tokenizers as columns."""
    names = report["tokenizers"]
    by = {(r["source"], r["tokenizer"]): r for r in report["per_source"]}
    lines = [f"# Tokenizer analysis: {', '.join(names)}", ""]
    metrics = [("fertility", "Fertility (tokens per word; per char for unspaced scripts)"),
               ("chars_per_token", "Characters per token"), ("bytes_per_token", "Bytes per token"),
               ("byte_fallback_rate", "Byte-fallback / partial-character token rate"),
               ("split4_word_share", "Share of words split into >= 4 tokens")]
    if report.get("reference_lang"):
        metrics.append(("ratio_to_reference", f"Token count relative to {report['reference_lang']} (parallel)"))
    for key, title in metrics:
        lines += [f"## {title}", "", "| source | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for src in report["sources"]:
            lines.append(f"| {src} | " + " | ".join(_cell(by[(src, n)], key) for n in names) + " |")
        lines.append("")
    lines += ["## Overall", "", "| tokenizer | vocab | tokens | chars/token | tokens/word |", "|---|---|---|---|---|"]
    for o in report["overall"]:
        lines.append(f"| {o['tokenizer']} | {o['vocab_size']} | {o['num_tokens']} | "
                     f"{o['chars_per_token']:.3f} | {o['tokens_per_word']:.3f} |")
    lines += ["", "## Most fragmented frequent words", ""]
    for r in report["per_source"]:
        words = ", ".join(f"{m['word']} ({m['tokens']})" for m in r["most_fragmented"][:5])
        lines.append(f"- {r['source']} / {r['tokenizer']}: {words}")
    return "\n".join(lines) + "\n"


def plot_fertility(report: dict, path: str | os.PathLike) -> None:
    """Grouped bar chart: fertility per source, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, sources = report["tokenizers"], report["sources"]
    by = {(r["source"], r["tokenizer"]): r["fertility"] for r in report["per_source"]}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(sources) * len(names) + 2), 4))
    for k, n in enumerate(names):
        xs = [i + k * width for i in range(len(sources))]
        ax.bar(xs, [by[(s, n)] for s in sources], width, label=n)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(sources))])
    ax.set_xticklabels(sources, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens per word (per char: unspaced scripts)")
    ax.set_title("Tokenizer fertility")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: covers no bar
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _pieces(tok, ids: list[int]) -> list[str]:
    """The text each token adds; a token holding only part of a UTF-8 character adds "" and the token
    that completes it carries the whole character (so the pieces always join to the word)."""
    out, prev = [], ""
    for k in range(len(ids)):
        cur = tok.decode(ids[: k + 1], skip_special_tokens=False)
        done = cur.rstrip("\ufffd")
        out.append(done[len(prev):] if done.startswith(prev) else cur[len(prev):])
        prev = done if done.startswith(prev) else cur
    return out
