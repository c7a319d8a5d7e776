"""Text scores as pure functions of strings: BLEU, ROUGE, exact match.

The tests check them against the libraries (sacrebleu, rouge-score).
"""


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation)."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 (0-1) over pairs, rouge-score with stemming."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  kinds = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  totals = dict.fromkeys(kinds, 0.0)
  for hyp, ref in zip(hypotheses, references):
    scores = scorer.score(ref, hyp)  # (target, prediction)
    for k in kinds:
      totals[k] += scores[k].fmeasure
  return {k: v / max(len(hypotheses), 1) for k, v in totals.items()}


def first_line(text: str) -> str:
  """What a classification-style answer is compared on."""
  return text.strip().split('\n', 1)[0].strip()


def exact_match(predictions: list[str], answers: list[str]) -> tuple[int, float]:
  """Correct count and accuracy of first lines against stripped answers."""
  correct = sum(first_line(p) == a.strip() for p, a in zip(predictions, answers))
  return correct, correct / max(len(answers), 1)
