"""Output heads of the classifier: what each head predicts and how it is scored.

A head's `name` is both the key of its output in the model's head dict and the
key of its target in a batch (`<name>_mask`, when present, marks known targets).
The input pipeline derives the heads from a data set's features, so the same
model and losses serve the 15 ChestX-ray14 findings, the metadata heads of the
paper's Fig. 4 and the 3-class transfer set.
"""

import dataclasses

MULTILABEL = 'multilabel'  # independent sigmoids, one per name (findings)
BINARY = 'binary'  # one sigmoid; target in {0, 1} (view, sex, age above median)
MULTICLASS = 'multiclass'  # softmax over names (transfer-learning classes)
REGRESSION = 'regression'  # one real value; target / scale is predicted (age)

KINDS = (MULTILABEL, BINARY, MULTICLASS, REGRESSION)


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
