"""Caption metrics for open answers: METEOR, BLEU-1..4 and ROUGE-L from pycocoevalcap.

Numbers are the COCO caption evaluation's: the scorers are pycocoevalcap's own
(``Meteor`` runs the reference Java METEOR 1.5 jar, ``Bleu`` and ``Rouge`` are its
Python scorers), fed exactly as pycocoevalcap's ``PTBTokenizer`` would feed them.

Tokenisation (:data:`TOKENIZATION`), applied to predictions and references alike:

1. every run of whitespace (including ``\\r``, tabs and Unicode line separators)
   becomes one space, so one text is always one line for the Java tools;
2. Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` (the jar
   shipped with pycocoevalcap) lower-cases and splits punctuation;
3. tokens in pycocoevalcap's ``PUNCTUATIONS`` list are dropped.

For single-line texts this is token for token what
``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` produces (quirks included:
brackets become ``-lrb-``/``-rrb-`` and survive, because that list is upper case).
Unlike that class it reads from stdin instead of writing a temporary file into the
installed package, and step 1 keeps a stray ``\\r`` from shifting every following
text onto the wrong reference.

METEOR's Java process is started once per :class:`TextScorer` and reused for every
pair and every subset; an empty prediction is scored (0) like any other.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from slidevl.errors import ServiceError

TOKENIZATION = (
    "whitespace collapsed to single spaces; Stanford PTBTokenizer (CoreNLP 3.4.1 from pycocoevalcap) "
    "with -preserveLines -lowerCase; pycocoevalcap PUNCTUATIONS tokens removed"
)
METRIC_NAMES: tuple[str, ...] = ("meteor", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
_JAVA_HINT = "install a Java runtime (8 or newer) and put `java` on PATH"


class MetricsError(ServiceError):
    """A text metric could not be computed (no Java, or a Java tool failed)."""


def tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenise texts the COCO-caption way (see the module docstring); one Java call."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    texts = list(texts)
    if not texts:
        return []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
    lines = [" ".join(text.split()) for text in texts]
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    cmd = [
        "java",
        "-cp",
        os.path.join(jar_dir, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
    ]
    try:
        proc = subprocess.run(cmd, input="\n".join(lines).encode("utf-8"), capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise MetricsError(f"the PTB tokenizer needs Java: {_JAVA_HINT}") from exc
    if proc.returncode != 0:
        raise MetricsError(
            f"Stanford PTBTokenizer failed (exit {proc.returncode}): {proc.stderr.decode('utf-8', 'replace')[-500:]}"
        )
    out = proc.stdout.decode("utf-8").split("\n")
    # The tokenizer keeps one output line per input line, but trailing empty lines
    # may be dropped; anything else means the alignment is broken and must not pass.
    if len(out) < len(lines):
        if any(lines[len(out):]):
            raise MetricsError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} texts")
        out += [""] * (len(lines) - len(out))
    if len(out) > len(lines) and any(out[len(lines):]):
        raise MetricsError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} texts")
    punct = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in out[: len(lines)]]


@dataclass(frozen=True)
class PairScores:
    """Metrics of one prediction against its reference."""

    meteor: float
    bleu: tuple[float, float, float, float]
    rouge_l: float

    def as_dict(self) -> dict[str, float]:
        """``{"meteor", "bleu_1".."bleu_4", "rouge_l"}``."""
        out = {"meteor": self.meteor}
        out.update({f"bleu_{n + 1}": b for n, b in enumerate(self.bleu)})
        out["rouge_l"] = self.rouge_l
        return out


class TextScorer:
    """Owns one METEOR Java process; scores batches of (prediction, reference) pairs.

    Use as a context manager (or call :meth:`close`). Pass ``meteor`` to reuse a
    running ``pycocoevalcap.meteor.meteor.Meteor``; it is then left running on close.
    """

    def __init__(self, meteor: object | None = None) -> None:
        self._meteor = meteor
        self._owns_meteor = meteor is None

    def __enter__(self) -> "TextScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR process if this scorer started it."""
        meteor, self._meteor = self._meteor, None
        if meteor is not None and self._owns_meteor:
            with meteor.lock:
                proc = meteor.meteor_p
                if proc.poll() is None:
                    proc.stdin.close()
                    proc.kill()
                    proc.wait()

    @property
    def meteor(self):  # -> pycocoevalcap.meteor.meteor.Meteor
        """The METEOR wrapper, started on first use."""
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            try:
                self._meteor = Meteor()
            except FileNotFoundError as exc:
                raise MetricsError(f"METEOR runs pycocoevalcap's reference Java jar: {_JAVA_HINT}") from exc
            self._owns_meteor = True
        return self._meteor

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> "TextScores":
        """Tokenise and score the pairs; corpus scores for any subset come from the result."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        tokens = tokenize([*predictions, *references])
        return self.score_tokenized(tokens[: len(predictions)], tokens[len(predictions):])

    def score_tokenized(self, hyps: Sequence[str], refs: Sequence[str]) -> "TextScores":
        """Score pairs that are already tokenised (space-separated tokens, one reference each)."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge

        hyps, refs = list(hyps), list(refs)
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
        if not hyps:
            return TextScores(self, [], [], [], [])
        gts = {i: [r] for i, r in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        stats = self._meteor_stats(hyps, refs)
        meteor_scores, _ = self._meteor_eval(stats)
        _, bleu_scores = Bleu(4).compute_score(gts, res, verbose=0)
        _, rouge_scores = Rouge().compute_score(gts, res)
        per_pair = [
            PairScores(
                meteor=float(meteor_scores[i]),
                bleu=tuple(float(bleu_scores[n][i]) for n in range(4)),  # type: ignore[arg-type]
                rouge_l=float(rouge_scores[i]),
            )
            for i in range(len(hyps))
        ]
        return TextScores(self, hyps, refs, stats, per_pair)

    # METEOR speaks a line protocol: "SCORE ||| ref ||| hyp" returns a line of
    # statistics; "EVAL ||| stats ||| stats ..." returns one score per segment and
    # then the aggregate. Keeping the statistics lets every subset get its corpus
    # score without re-aligning, exactly as ``Meteor.compute_score`` computes it.
    def _meteor_stats(self, hyps: Sequence[str], refs: Sequence[str]) -> list[str]:
        meteor = self.meteor
        stats = []
        with meteor.lock:
            for hyp, ref in zip(hyps, refs):
                line = meteor._stat(hyp, [ref])
                if not line:
                    raise MetricsError(f"METEOR Java process stopped responding{self._stderr_tail()}")
                stats.append(line)
        return stats

    def _meteor_eval(self, stats: Sequence[str]) -> tuple[list[float], float]:
        meteor = self.meteor
        with meteor.lock:
            proc = meteor.meteor_p
            try:
                proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
                proc.stdin.flush()
                values = [float(proc.stdout.readline().strip()) for _ in range(len(stats) + 1)]
            except (ValueError, OSError) as exc:
                raise MetricsError(f"METEOR Java process failed: {exc}{self._stderr_tail()}") from exc
        return values[:-1], values[-1]

    def _stderr_tail(self) -> str:
        proc = self._meteor.meteor_p if self._meteor is not None else None
        if proc is None or proc.poll() is None:
            return ""
        err = proc.stderr.read().decode("utf-8", "replace")[-500:]
        return f" (exit {proc.returncode}): {err}"


class TextScores:
    """Per-pair scores of one batch plus corpus scores for any subset of it.

    Corpus scores follow pycocoevalcap: METEOR is the jar's aggregate over the
    subset, BLEU-n is corpus BLEU ("closest" reference length), ROUGE-L the mean.
    Corpus METEOR needs the :class:`TextScorer` that made this object still open.
    """

    def __init__(
        self,
        scorer: TextScorer,
        hyps: list[str],
        refs: list[str],
        meteor_stats: list[str],
        per_pair: list[PairScores],
    ) -> None:
        self._scorer = scorer
        self.hyps = hyps
        self.refs = refs
        self._stats = meteor_stats
        self.per_pair = per_pair

    def __len__(self) -> int:
        return len(self.per_pair)

    def corpus(self, indices: Iterable[int] | None = None) -> dict[str, float]:
        """Corpus scores over ``indices`` (all pairs when None), keyed as :data:`METRIC_NAMES`."""
        from pycocoevalcap.bleu.bleu import Bleu

        idx = list(range(len(self))) if indices is None else list(indices)
        if not idx:
            raise ValueError("corpus scores need at least one pair")
        _, meteor = self._scorer._meteor_eval([self._stats[i] for i in idx])
        gts = {i: [self.refs[i]] for i in idx}
        res = {i: [self.hyps[i]] for i in idx}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge = float(np.mean(np.array([self.per_pair[i].rouge_l for i in idx])))
        out = {"meteor": float(meteor)}
        out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        out["rouge_l"] = rouge
        return out
