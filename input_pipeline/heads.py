"""Output heads of the classifier: what each head predicts and how it is scored.

A head's `name` is both the key of its output in the model's head dict and the
key of its target in a batch (`<name>_mask`, when present, marks known targets).
The input pipeline derives the heads from a data set's features, so the same
model and losses serve the 15 ChestX-ray14 findings, the metadata heads of the
paper's Fig. 4 and the 3-class transfer set.
"""

import dataclasses

from input_pipeline import labels as labels_lib

MULTILABEL = 'multilabel'  # independent sigmoids, one per name (findings)
BINARY = 'binary'  # one sigmoid; target in {0, 1} (view, sex, age above median)
MULTICLASS = 'multiclass'  # softmax over names (transfer-learning classes)
REGRESSION = 'regression'  # one real value; target / scale is predicted (age)

KINDS = (MULTILABEL, BINARY, MULTICLASS, REGRESSION)

AGE_ABOVE_MEDIAN = 'age_above_median'  # binary head derived from the age feature
AGE_SCALE = 100.0  # the age head predicts years / 100


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One classifier output."""

  name: str
  kind: str
  # Class or label names; for BINARY the (negative, positive) names.
  names: tuple[str, ...] = ()
  # REGRESSION only: the head predicts target / scale (age / 100).
  scale: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'head {self.name!r}: kind {self.kind!r} not in {KINDS}')
    if self.kind in (MULTILABEL, MULTICLASS) and not self.names:
      raise ValueError(f'head {self.name!r}: a {self.kind} head needs names')

  @property
  def size(self) -> int:
    """Number of logits this head takes from the classifier's output."""
    if self.kind in (MULTILABEL, MULTICLASS):
      return len(self.names)
    return 1

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> 'HeadSpec':
    return cls(
        name=data['name'],
        kind=data['kind'],
        names=tuple(data.get('names', ())),
        scale=float(data.get('scale', 1.0)),
    )


def labels_head() -> HeadSpec:
  """The 15 ChestX-ray14 findings (with No Finding) as independent sigmoids."""
  return HeadSpec('labels', MULTILABEL, labels_lib.LABELS)


def age_heads() -> tuple[HeadSpec, HeadSpec]:
  """The two heads of an age feature: above the median, and years / 100."""
  return (HeadSpec(AGE_ABOVE_MEDIAN, BINARY, ('below', 'above')),
          HeadSpec('age', REGRESSION, scale=AGE_SCALE))


def chestxray14_heads() -> tuple[HeadSpec, ...]:
  """The heads the pipeline gives ChestX-ray14 and its phantom (findings,
  view, sex, age above the median, age), without reading a data set."""
  return (labels_head(),
          HeadSpec('view', BINARY, labels_lib.VIEWS),
          HeadSpec('sex', BINARY, labels_lib.SEXES),
          *age_heads())
