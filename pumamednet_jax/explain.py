r"""Explanations of a checkpoint, and how faithful they are (paper Figs. 5, 6).

  python -m pumamednet_jax.explain --workdir W --out DIR [--config C] \
      [--split validation] [--num_images 8] [--attributes health,age,...] \
      [--heads Cardiomegaly,...] [--step N]

Three kinds of edit of an image's latent mean z, each decoded frame by frame:
interpolation z + α(z̄₁ − z̄₀) between the mean latents of an attribute's
groups (Fig. 5), traversal of one latent over ±3 standard deviations, for
the latents most relevant to a head (Fig. 6), and latent shift (`latent.py`;
`predict --explain`). DIR receives:

  interpolation_<attribute>.png  rows are images, columns α from −2 to 2, the
      model's probability of the attribute under each frame;
  traversal_<head>.png  the head's 3 most relevant latents, each traversed;
  relevance.json, relevance.png  every latent's relevance to every head, by
      two methods (gradient × std and one-latent ablation), ranked;
  explain.json  faithfulness figures, measured with independent judges
      (`judge.py`) that never see the model's edits or its classifier:
        interpolation/<attribute>: rho_model, rho_judge (median over images
          of Spearman's ρ between α and the probability), specificity
          (median over images of the largest |Δp| of the judges' other
          attributes over |Δp| of the target, α = −2 → 2);
        ablation/<head>: the head's AUC drop with its 5 most relevant latents
          set to their means, and with 5 random ones (mean of 20 draws);
        traversal/Cardiomegaly: ρ between the step of its most relevant
          latent and the judge's heart size, and the specificity as above;
        judge/<attribute>: the judges' held-out AUC (R² for heart_size);
  index.html  one page, images inlined: pick an image and an edit, drag the
      slider through the frames and watch every head's probability.

The probability under a frame is the model's score of the decoded frame
encoded again: what the model says of the picture shown.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from scipy import stats

from input_pipeline import heads as heads_lib
from input_pipeline import labels as labels_lib
from input_pipeline import pipeline
from pumamednet_jax import checkpoints
from pumamednet_jax import explain_figures
from pumamednet_jax import judge as judge_lib
from pumamednet_jax import inference
from pumamednet_jax import latent as latent_lib
from pumamednet_jax import parallel
from pumamednet_jax import stats as stats_lib

ALPHAS = tuple(np.round(np.linspace(-2.0, 2.0, 9), 3))
STEPS = tuple(np.round(np.linspace(-3.0, 3.0, 7), 3))
DEFAULT_ATTRIBUTES = ('health', 'age', 'sex', 'view', 'Cardiomegaly')
DEFAULT_HEADS = ('Cardiomegaly', 'No Finding', 'sex', 'view',
                 'age_above_median')
TOP_LATENTS = 3  # latents traversed per head
NUM_ABLATED = 5  # latents set to their means in the ablation test
RANDOM_DRAWS = 20  # draws of random latents it is compared with
ABLATION_CURVE = (1, 2, 5, 10, 20, 50)
RELEVANCE_METHOD = 'gradient'
FIGURE_TRAVERSAL_IMAGES = 3  # images per traversal figure
# The model's output that scores each metadata attribute's group 1.
MODEL_OUTPUT = {judge_lib.HEALTH: labels_lib.NO_FINDING,
                judge_lib.SEX: 'sex', judge_lib.VIEW: 'view',
                judge_lib.AGE: pipeline.AGE_ABOVE_MEDIAN}
CARDIOMEGALY = 'Cardiomegaly'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to explain and on how many examples."""
  split: str = 'validation'
  num_images: int = 8  # images shown in the figures and the page
  attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
  heads: tuple[str, ...] = DEFAULT_HEADS
  step: int | None = None
  num_eval: int = 64  # images over which faithfulness is measured
  num_reference: int = 0  # examples of directions and relevance (0: all)
  judge_split: str = 'test'
  num_judge: int = 2000  # examples the judges are fitted and measured on
  relevance: str = RELEVANCE_METHOD  # the ranking the figures use
  seed: int = 0


def model_output(attribute: str, outputs) -> str:
  """The model's output that scores `attribute` (its group 1)."""
  name = MODEL_OUTPUT.get(attribute, attribute)
  names = [o.name for o in outputs]
  if name == pipeline.AGE_ABOVE_MEDIAN and name not in names:
    name = 'age'
  return name


def attribute_of_output(name: str) -> str | None:
  """The attribute whose labels give output `name` its AUC (or None)."""
  for attribute, output in MODEL_OUTPUT.items():
    if output == name:
      return attribute
  return name if name in labels_lib.FINDINGS else None


def check_heads(names, outputs) -> None:
  valid = [o.name for o in outputs]
  unknown = [name for name in names if name not in valid]
  if unknown:
    raise ValueError(f'unknown head(s) {", ".join(map(repr, unknown))}; '
                     f'valid: {", ".join(valid)}')


def median_rho(steps, values: np.ndarray) -> float:
  """Median over rows of Spearman's ρ between `steps` and the row; a
  constant row counts ρ = 0 (it does not follow the steps)."""
  rhos = []
  for row in values:
    rho = (stats.spearmanr(steps, row).statistic
           if np.ptp(row) > 0 else 0.0)
    rhos.append(0.0 if np.isnan(rho) else rho)
  return float(np.median(rhos))


def specificity(judged: dict[str, np.ndarray], target: str,
                others) -> tuple[float, dict[str, float]]:
  """Median over images of max over `others` of |Δ other| / |Δ target|,
  Δ from the first frame to the last; and the median of each other's."""
  delta = {name: np.abs(judged[name][:, -1] - judged[name][:, 0])
           for name in (target, *others)}
  base = np.maximum(delta[target], 1e-6)
  if not others:
    return 0.0, {}
  ratios = {name: delta[name] / base for name in others}
  worst = np.max(np.stack(list(ratios.values())), axis=0)
  return float(np.median(worst)), {name: float(np.median(r))
                                   for name, r in ratios.items()}


def judge_frames(judges: judge_lib.Judges, frames: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """(N, A, S, S) frames → {judge name: (N, A)}."""
  count, steps = frames.shape[:2]
  return {name: value.reshape(count, steps) for name, value in
          judges.predict(frames.reshape(-1, *frames.shape[2:])).items()}


def _edit(model: latent_lib.LatentModel, latents: np.ndarray):
  """(N, A, D) latents → frames (N, A, S, S) and their scores (N, A, K)."""
  count, steps = latents.shape[:2]
  frames = model.decode(latents.reshape(count * steps, -1))
  scores = model.frame_scores(frames)
  return (frames.reshape(count, steps, *frames.shape[1:]),
          scores.reshape(count, steps, -1))


def _auc(target: np.ndarray, score: np.ndarray) -> float:
  if len(np.unique(target)) < 2:
    return float('nan')
  return stats_lib.auc(score, target)


def greedy_ablation(model, z, target, column: int, count: int):
  """The latents, chosen one at a time with the labels, whose ablation
  lowers the AUC of output `column` most, and the AUC after each choice.

  An optimistic bound on what any ranking of `count` latents can do (it
  sees the labels it is measured on): when even it moves the AUC little,
  the classifier spreads what it reads over many latents.
  """
  mean = z.mean(axis=0)
  chosen = np.zeros(z.shape[1], bool)
  aucs = []
  for _ in range(min(count, z.shape[1])):
    candidates = np.flatnonzero(~chosen)
    masks = np.repeat(chosen[None], len(candidates), axis=0)
    masks[np.arange(len(candidates)), candidates] = True
    scores = model.masked_logits(z, masks, mean)[:, :, column]
    # AUC = Mann-Whitney U / (positives × negatives), for every candidate.
    positive = target.astype(bool)
    u = stats.mannwhitneyu(scores[:, positive], scores[:, ~positive],
                           axis=1).statistic
    candidate_aucs = u / (positive.sum() * (~positive).sum())
    best = int(np.argmin(candidate_aucs))
    chosen[candidates[best]] = True
    aucs.append(float(candidate_aucs[best]))
  return np.flatnonzero(chosen), aucs


def ablation(model, z, examples, relevance: np.ndarray, seed: int,
             greedy: bool = False) -> dict:
  """Per head with an AUC: the AUC drop with its top NUM_ABLATED latents set
  to their means, against NUM_ABLATED random latents (mean of RANDOM_DRAWS),
  and the AUC after ablating the top k for k in ABLATION_CURVE; with
  `greedy`, also the drop of `greedy_ablation`'s NUM_ABLATED latents."""
  mean = z.mean(axis=0)
  scores = model.logits(z)
  rng = np.random.default_rng(seed)
  dim = z.shape[1]
  random_sets = [rng.choice(dim, min(NUM_ABLATED, dim), replace=False)
                 for _ in range(RANDOM_DRAWS)]
  random_scores = [model.logits(latent_lib.ablate(z, s, mean))
                   for s in random_sets]
  results = {}
  for k, output in enumerate(model.outputs):
    attribute = attribute_of_output(output.name)
    if (output.head.kind == heads_lib.REGRESSION or attribute is None
        or attribute not in judge_lib.available(examples)):
      continue
    target = judge_lib.values(attribute, examples)
    base = _auc(target, scores[:, k])
    if np.isnan(base):
      continue
    ranked = np.argsort(-relevance[k])
    curve = {}
    for count in (*ABLATION_CURVE, NUM_ABLATED):
      if count <= dim:
        ablated = model.logits(latent_lib.ablate(z, ranked[:count], mean))
        curve[str(count)] = _auc(target, ablated[:, k])
    random_drop = float(np.mean([base - _auc(target, s[:, k])
                                 for s in random_scores]))
    results[output.name] = {
        'auc': base,
        'top5_auc_drop': base - curve[str(min(NUM_ABLATED, dim))],
        'random5_auc_drop': random_drop,
        'top5_latents': [int(j) for j in ranked[:NUM_ABLATED]],
        'auc_with_top_k_ablated': curve}
    if greedy:
      latents, aucs = greedy_ablation(model, z, target, k, NUM_ABLATED)
      results[output.name].update(greedy5_auc_drop=base - aucs[-1],
                                  greedy5_latents=[int(j) for j in latents])
  return results


def relevance_report(outputs, relevances: dict[str, np.ndarray]) -> dict:
  """relevance.json: per method and head, latents ranked by score; and how
  well the methods agree (Spearman's ρ, shared top 5)."""
  report = {'methods': {
      'gradient': 'mean over examples of |d logit / d z_j|, times std(z_j)',
      'ablation': 'mean over examples of |logit(z) - logit(z, z_j := '
                  'mean(z_j))|'}, 'ranking': {}, 'agreement': {}}
  for method, relevance in relevances.items():
    report['ranking'][method] = {
        o.name: [{'latent': int(j), 'score': float(relevance[k, j])}
                 for j in np.argsort(-relevance[k])]
        for k, o in enumerate(outputs)}
  if len(relevances) == 2:
    a, b = relevances.values()
    for k, o in enumerate(outputs):
      shared = set(np.argsort(-a[k])[:NUM_ABLATED]) & set(
          np.argsort(-b[k])[:NUM_ABLATED])
      report['agreement'][o.name] = {
          'spearman': float(stats.spearmanr(a[k], b[k]).statistic),
          'shared_top5': len(shared)}
  return report


def load(workdir: str, config, step: int | None):
  """The latent model of a checkpoint (`step`, or else the best by
  validation mean AUC, or else the latest) on one device, and its data
  set's builder."""
  sources = pipeline.get_sources(config)
  if len(sources) != 1:
    raise ValueError('explain reads one data set; config.dataset is '
                     f'{config.dataset!r}')
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]),
                           (parallel.AXIS,))
  checkpoint = inference.load_checkpoint(workdir, mesh, step,
                                         compute_from=config)
  if checkpoint.model_config.image_size != config.image_size:
    raise ValueError(
        f'the checkpoint in {checkpoints.checkpoint_dir(workdir)} reads '
        f'{checkpoint.model_config.image_size} px images but '
        f'config.image_size is {config.image_size}; pass the config it was '
        'trained with')
  pipeline.prepare(sources)
  model = latent_lib.LatentModel(checkpoint.model_config, checkpoint.params,
                                 checkpoint.policy)
  return model, sources[0].builder, checkpoint.step


def explain(workdir: str, out: str, config,
            settings: Settings = Settings()) -> dict:
  """Writes the explanations of the checkpoint in `workdir` to `out` (see
  the module docstring); returns explain.json's content."""
  model, builder, step = load(workdir, config, settings.step)
  median = (pipeline.age_median(builder) if 'age' in builder.info.features
            else None)
  examples = judge_lib.load_examples(builder, settings.split,
                                     settings.num_reference, median)
  judge_lib.check_attributes(settings.attributes, examples)
  check_heads(settings.heads, model.outputs)
  num_eval = min(max(settings.num_eval, settings.num_images),
                 len(examples.images))
  os.makedirs(out, exist_ok=True)
  names = [o.name for o in model.outputs]

  z = model.encode(examples.images)
  relevances = {method: fn(model, z) for method, fn in
                latent_lib.RELEVANCE_METHODS.items()}
  relevance = relevances[settings.relevance]
  relevance_json = relevance_report(model.outputs, relevances)
  relevance_json['method'] = settings.relevance
  _write_json(os.path.join(out, 'relevance.json'), relevance_json)
  explain_figures.relevance_figure(os.path.join(out, 'relevance.png'),
                                   names, relevance, settings.relevance)

  # The judges: fitted on the model's reconstructions of another split.
  judged_attributes = tuple(dict.fromkeys(
      [a for a in judge_lib.JUDGED if a in judge_lib.available(examples)]
      + list(settings.attributes)))
  judge_examples = judge_lib.load_examples(builder, settings.judge_split,
                                           settings.num_judge, median)
  reconstructions = model.decode(model.encode(judge_examples.images))
  judges = judge_lib.fit_judges(reconstructions, judge_examples,
                                judged_attributes, settings.seed)
  logging.info('judges: %s', judges.heldout)

  z_eval = z[:num_eval]
  page_edits = []
  interpolation = {}
  for attribute in settings.attributes:
    direction = latent_lib.group_direction(
        z, judge_lib.values(attribute, examples))
    latents = latent_lib.interpolations(z_eval, direction, ALPHAS)
    frames, scores = _edit(model, latents)
    judged = judge_frames(judges, frames)
    column = names.index(model_output(attribute, model.outputs))
    others = [a for a in judges.names if a not in (
        attribute, judge_lib.HEART_SIZE, *judge_lib.entailed(attribute))]
    worst, each = specificity(judged, attribute, others)
    latent_scores = model.scores(latents.reshape(-1, z.shape[1]))
    interpolation[attribute] = {
        'rho_model': median_rho(ALPHAS, scores[:, :, column]),
        'rho_judge': median_rho(ALPHAS, judged[attribute]),
        'specificity': worst,
        'specificity_by_attribute': each,
        'rho_model_latent': median_rho(
            ALPHAS, latent_scores[:, column].reshape(num_eval, -1)),
        'model_output': names[column]}
    explain_figures.edit_figure(
        os.path.join(out, f'interpolation_{attribute}.png'),
        examples.images[:settings.num_images] / 255.0,
        frames[:settings.num_images], scores[:settings.num_images, :, column],
        [f'α = {a:+g}' for a in ALPHAS],
        f'{attribute}: z + α (z̄₁ − z̄₀), group 1 = '
        f'{judge_lib.MEANINGS.get(attribute, attribute)}; p = {names[column]}')
    page_edits.append(('attribute', attribute, ALPHAS, frames, scores))

  mean, std = z.mean(axis=0), z.std(axis=0)
  page_latents = []
  for head in settings.heads:
    k = names.index(head)
    top = [int(j) for j in np.argsort(-relevance[k])[:TOP_LATENTS]]
    page_latents.extend(j for j in top if j not in page_latents)
    count = min(FIGURE_TRAVERSAL_IMAGES, settings.num_images)
    rows, row_scores, labels = [], [], []
    for j in top:
      frames, scores = _edit(model, latent_lib.traversals(
          z[:count], j, mean, std, STEPS))
      rows.append(frames)
      row_scores.append(scores[:, :, k])
      labels.extend(f'z{j}, image {i}' for i in range(count))
    explain_figures.edit_figure(
        os.path.join(out, f'traversal_{_file_name(head)}.png'), None,
        np.concatenate(rows), np.concatenate(row_scores),
        [f'{s:+g} sd' for s in STEPS],
        f'{head}: its {len(top)} most relevant latents ({settings.relevance}'
        f' relevance), each set to mean + t·sd; p = {head}', labels)
  for j in page_latents:
    frames, scores = _edit(model, latent_lib.traversals(
        z[:settings.num_images], j, mean, std, STEPS))
    page_edits.append(('latent', f'z{j}', STEPS, frames, scores))

  traversal = {}
  if CARDIOMEGALY in names and judge_lib.HEART_SIZE in judges.names:
    k = names.index(CARDIOMEGALY)
    j = int(np.argmax(relevance[k]))
    frames, _ = _edit(model, latent_lib.traversals(z_eval, j, mean, std,
                                                   STEPS))
    judged = judge_frames(judges, frames)
    others = [a for a in judges.names if a not in (
        CARDIOMEGALY, judge_lib.HEART_SIZE, *judge_lib.entailed(CARDIOMEGALY))]
    # The sign of the latent is arbitrary: ρ is taken along the direction
    # that raises the model's Cardiomegaly score.
    sign = float(np.sign(_mean_gradient_sign(model, z, k, j)))
    worst, each = specificity(judged, CARDIOMEGALY, others)
    traversal[CARDIOMEGALY] = {
        'latent': j, 'direction': sign,
        'rho_judge_heart_size': median_rho(
            sign * np.asarray(STEPS), judged[judge_lib.HEART_SIZE]),
        'rho_judge_cardiomegaly': median_rho(sign * np.asarray(STEPS),
                                             judged[CARDIOMEGALY]),
        'specificity': worst, 'specificity_by_attribute': each}

  result = {
      'interpolation': interpolation,
      'ablation': ablation(model, z, examples, relevance, settings.seed,
                           greedy=True),
      'ablation_by_method': {
          method: ablation(model, z, examples, r, settings.seed)
          for method, r in relevances.items()},
      'traversal': traversal,
      'judge': judges.heldout,
      'settings': {**dataclasses.asdict(settings), 'num_eval': num_eval,
                   'num_reference': len(examples.images),
                   'num_judge': len(judge_examples.images),
                   'workdir': os.path.abspath(workdir), 'checkpoint_step': step,
                   'alphas': list(ALPHAS), 'steps': list(STEPS)},
  }
  result['ablation_summary'] = {
      method: _ablation_summary(table)
      for method, table in result['ablation_by_method'].items()}
  _write_json(os.path.join(out, 'explain.json'), result)
  explain_figures.write_page(
      os.path.join(out, 'index.html'), examples.images[:settings.num_images],
      model.decode(z[:settings.num_images]), page_edits, names,
      settings.num_images, result)
  return result


def _mean_gradient_sign(model, z, k, j) -> float:
  return float(model.gradients(z[:256])[:, k, j].mean())


def _ablation_summary(table: dict) -> dict:
  """How many findings pass top5 ≥ 5 × random5."""
  findings = [name for name in table if name in labels_lib.FINDINGS]
  passed = [name for name in findings
            if table[name]['top5_auc_drop']
            >= 5 * max(table[name]['random5_auc_drop'], 0.0)
            and table[name]['top5_auc_drop'] > 0]
  return {'findings': len(findings), 'passed': len(passed),
          'passed_names': passed}


def _file_name(name: str) -> str:
  return name.replace(' ', '_').replace('/', '_')


def _write_json(path: str, data) -> None:
  with open(path, 'w') as file:
    json.dump(data, file, indent=1, allow_nan=True)


# --- Command line -------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'configs', 'default.py'),
    'The training config (its data set and image size).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training directory.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Split explained.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8,
                                   'Images in the figures and the page.')
_ATTRIBUTES = flags.DEFINE_list('attributes', list(DEFAULT_ATTRIBUTES),
                                'Attributes interpolated.')
_HEADS = flags.DEFINE_list('heads', list(DEFAULT_HEADS),
                           'Heads whose relevant latents are traversed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step.
  settings = Settings(split=_SPLIT.value, num_images=_NUM_IMAGES.value,
                      attributes=tuple(_ATTRIBUTES.value),
                      heads=tuple(_HEADS.value), step=_STEP.value)
  try:
    result = explain(_WORKDIR.value, _OUT.value, _CONFIG.value, settings)
  except (ValueError, FileNotFoundError) as error:
    print(f'explain: {error}', file=sys.stderr)
    return 1
  print(summary_line(result, _OUT.value))
  return 0


def summary_line(result: dict, out: str) -> str:
  parts = [f'{a}: rho_model {v["rho_model"]:.2f} rho_judge '
           f'{v["rho_judge"]:.2f} specificity {v["specificity"]:.2f}'
           for a, v in result['interpolation'].items()]
  summary = result['ablation_summary'][result['settings']['relevance']]
  return (f'explain: wrote {out}; ' + '; '.join(parts) +
          f'; ablation top5 ≥ 5 × random5 for {summary["passed"]} of '
          f'{summary["findings"]} findings')


if __name__ == '__main__':
  app.run(main)
