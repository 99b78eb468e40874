"""Multi-word domain tokens for GPT-2-style byte-level BPE ("Ġblood Ġpressure" as one token).

GPT-2's pre-tokenizer splits text into words before BPE, so no merge can ever span two words. A
multi-word token therefore needs a pre-tokenizer change. We prepend the chosen phrases to the GPT-2
regex as a literal alternation (a trie, longest phrase first):

    Split("(?:<phrase trie>)|<GPT-2 regex>", isolated) -> ByteLevel(use_regex=False) -> BPE(ignore_merges)

Why this keeps every old encoding. A phrase is a sequence of consecutive BASE pre-tokens seen in the
domain text (no whitespace-only pre-token inside). The regex engine only tries a match where the previous
match ended, i.e. at a base pre-token boundary; there the base regex would split the phrase text into
exactly the phrase's elements, provided the last element also ends where the base would end it. Each
phrase carries a look-ahead for that (letters: `(?!\\p{L})`, digits: `(?!\\p{N})`, punctuation:
`(?![^\\s\\p{L}\\p{N}])`, contractions: none). So " blood pressure" matches in "high blood pressure." but
not in "xblood pressure" (no boundary before " blood") nor in " blood pressures" (look-ahead), and after a
phrase the text is pre-tokenized exactly as before. Text without phrases is pre-tokenized exactly as by
the base (the GPT-2 regex is unchanged). The phrase is then one pre-token; its byte-level string is in
the vocabulary and `ignore_merges=True` makes BPE emit it as one id. `ignore_merges` changes nothing else
because every base token is its own BPE result (checked at build time), and for new within-word tokens it
can only shorten an encoding. Decoding is plain byte-level, so decode(encode(x)) == x as before.

Selection: n-grams of 2..`max_words` base pre-tokens, scored by the real saving on the domain text:
occurrences x (base tokens - 1), where occurrences are counted by simulating the left-to-right,
longest-first matching on the domain corpus (so overlapping phrases are not double counted). Phrases made
only of very common base tokens (all ids < `common_rank`, e.g. " of the", ", and", ". The") are left
out: they save as much in general text as in the domain, which would change general token counts.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PHRASE_CONTRACTIONS", "phrase_lookahead", "phrase_regex", "pretoken_ids", "count_ngrams",
           "select_phrases", "cover"]

PHRASE_CONTRACTIONS = frozenset({"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"})
_HASH_MUL = np.uint64(1_000_003)


def phrase_lookahead(last: str) -> str:
    """The look-ahead that makes a phrase end where the GPT-2 regex would end its last pre-token."""
    import unicodedata

    if last in PHRASE_CONTRACTIONS:
        return ""
    ch = last[1:2] if last[:1] == " " and len(last) > 1 else last[:1]
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return r"(?!\p{L})"
    if cat[0] == "N":
        return r"(?!\p{N})"
    return r"(?![^\s\p{L}\p{N}])"


def _escape(ch: str) -> str:
    return "\\" + ch if ch in r"\^$.|?*+()[]{}" else ch


def phrase_regex(phrases: list[tuple[str, str]]) -> str:
    """A trie-shaped alternation of (text, look-ahead) pairs; at each position the longest phrase wins."""
    root: dict = {}
    for text, la in phrases:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = la

    def emit(node: dict) -> str:
        alts = [_escape(ch) + emit(node[ch]) for ch in sorted(k for k in node if k)]
        if "" in node:  # the phrase ending here is tried after every longer continuation
            alts.append(node[""])
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(root)


def pretoken_ids(lines: list[str], pattern: str, chunk_chars: int = 1 << 20):
    """Pre-tokenize `lines` with `pattern`: (int64 array of word ids, -1 for whitespace/chunk ends; words)."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(pattern), "isolated")
    ids: dict[str, int] = {}
    out: list[int] = []
    buf: list[str] = []
    size = 0

    def flush():
        for p, _ in split.pre_tokenize_str("".join(buf)):
            if p.isspace():
                out.append(-1)
            else:
                i = ids.get(p)
                if i is None:
                    i = ids[p] = len(ids)
                out.append(i)
        out.append(-1)

    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
            flush()
            buf, size = [], 0
    if buf:
        flush()
    return np.asarray(out, dtype=np.int64), list(ids)


def _windows(seq: np.ndarray, max_words: int):
    """Yield (k, hash, valid) for windows of k = 2..max_words consecutive non-whitespace pre-tokens."""
    valid = seq >= 0
    h = np.where(valid, seq + 1, 0).astype(np.uint64)
    for k in range(2, max_words + 1):
        m = len(seq) - k + 1
        if m <= 0:
            return
        nxt = seq[k - 1:]
        valid = valid[:m] & (nxt >= 0)
        h = h[:m] * _HASH_MUL + (np.maximum(nxt, 0) + 1).astype(np.uint64)
        yield k, h, valid


def count_ngrams(seq: np.ndarray, word_cost: np.ndarray, word_chars: np.ndarray, word_ok: np.ndarray, *,
                 max_words: int, max_chars: int, min_count: int) -> list[tuple[tuple[int, ...], int, int]]:
    """(word-id tuple, occurrences, base tokens) for each n-gram that passes the filters."""
    out = []
    s = np.maximum(seq, 0)
    cost, chars, ok = word_cost[s], word_chars[s], word_ok[s]
    c, n_chars, has_ok = cost.copy(), chars.copy(), ok.copy()
    for k, h, valid in _windows(seq, max_words):
        m = len(h)
        c = c[:m] + cost[k - 1:]
        n_chars = n_chars[:m] + chars[k - 1:]
        has_ok = has_ok[:m] | ok[k - 1:]
        sel = valid & (n_chars <= max_chars) & has_ok
        if not sel.any():
            continue
        u, first, cnt = np.unique(h[sel], return_index=True, return_counts=True)
        pos = np.nonzero(sel)[0][first]
        keep = cnt >= min_count
        for p, n in zip(pos[keep].tolist(), cnt[keep].tolist()):
            out.append((tuple(seq[p:p + k].tolist()), n, int(c[p])))
    return out


def cover(seq: np.ndarray, phrases: list[tuple[int, ...]], max_words: int):
    """Simulate longest-first, left-to-right phrase matching on `seq`.

    Returns (uses per phrase index, boolean mask of the positions covered by a phrase).
    """
    n = len(seq)
    best_k = np.zeros(n, dtype=np.int8)
    best_h = np.zeros(n, dtype=np.uint64)
    index: dict[tuple[int, int], int] = {}
    by_len: dict[int, list[int]] = {}
    for j, ph in enumerate(phrases):
        h = np.uint64(0)
        with np.errstate(over="ignore"):
            for w in ph:
                h = h * _HASH_MUL + np.uint64(w + 1)
        index[(len(ph), int(h))] = j
        by_len.setdefault(len(ph), []).append(int(h))
    windows = {k: (h, valid) for k, h, valid in _windows(seq, max_words)}
    for k in sorted(by_len, reverse=True):
        h, valid = windows[k]
        m = valid & np.isin(h, np.asarray(by_len[k], dtype=np.uint64)) & (best_k[:len(h)] == 0)
        best_k[:len(h)][m] = k
        best_h[:len(h)][m] = h[m]
    uses = [0] * len(phrases)
    covered = np.zeros(n, dtype=bool)
    end = 0
    pos = np.nonzero(best_k)[0]
    for i, k, h in zip(pos.tolist(), best_k[pos].tolist(), best_h[pos].tolist()):
        if i < end:
            continue
        uses[index[(k, h)]] += 1
        covered[i:i + k] = True
        end = i + k
    return uses, covered


def select_phrases(seq: np.ndarray, cands: list[tuple[tuple[int, ...], int, int]], budget: int, *,
                   max_words: int, rounds: int = 4) -> list[tuple[tuple[int, ...], int]]:
    """Up to `budget` phrases with their real saving (tokens) on `seq`, best first.

    Starts from the naive saving (occurrences x (tokens - 1)), then repeatedly measures the chosen set by
    simulated matching, so a phrase whose occurrences are taken by a longer or earlier one drops out.
    """
    est = [n * (c - 1) for _, n, c in cands]
    chosen: list[int] = []
    for _ in range(rounds):
        chosen = [j for j in sorted(range(len(cands)), key=lambda j: -est[j])[:budget] if est[j] > 0]
        uses, _ = cover(seq, [cands[j][0] for j in chosen], max_words)
        for j, u in zip(chosen, uses):
            est[j] = u * (cands[j][2] - 1)
    return sorted(((cands[j][0], est[j]) for j in chosen if est[j] > 0), key=lambda x: -x[1])
