"""Incremental detokenization with stop strings, shared by the server and the offline API."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-byte characters and the spacing rules of some tokenizers,
    so each delta is the difference between decoding a short window of recent tokens with and
    without the newest ones; text is held back while it ends in an incomplete character.
    With `stop` strings, text that could be the start of a stop string is held back too, so a stop
    string split across chunks is still found and never streamed.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.tokens = list(prompt_token_ids[-6:])  # a little context for spacing rules
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = [s for s in (stop or []) if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all text produced, stop-checked
        self.pending = ""  # text decoded but held back as a possible stop-string start
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, new_token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the text that may be emitted now. After a stop string is found,
        `stopped` is set and the text up to it is the last delta."""
        if self.stopped:
            return ""
        self.tokens += new_token_ids
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        delta = ""
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._check_stop(delta, final)

    def _check_stop(self, delta: str, final: bool) -> str:
        if not self.stop:
            self.text += delta
            return delta
        window = self.pending + delta
        for s in self.stop:
            cut = window.find(s)
            if cut >= 0:
                self.stopped = True
                out = window[:cut]
                self.pending = ""
                self.text += out
                return out
        if final:
            keep = 0
        else:
            # Hold back the longest tail that is a prefix of some stop string.
            keep = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(window)), 0, -1):
                    if window.endswith(s[:k]):
                        keep = max(keep, k)
                        break
        out, self.pending = window[:len(window) - keep], window[len(window) - keep:]
        self.text += out
        return out
