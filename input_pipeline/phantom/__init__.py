"""Procedural phantom chest X-rays with known generating factors.

The project's embedded default data set (the role dSprites plays for
disentanglement research): frontal chest radiographs rendered with numpy from a
seed, with every generating factor known, so training, defect correction,
per-finding AUC, latent interpolation, explainability and bias audits can run
without downloading real data.

An image is the display of a projected attenuation map: soft tissue of the body
outline, minus the air of two lungs whose shape follows the population lung map
of 517 real masks (`input_pipeline.assets.lung_prior`), plus heart, mediastinum,
spine, ribs, clavicles, scapulae, diaphragm domes, and the signatures of the 14
ChestX-ray14 findings (or, in the 'covid3' variant, COVID-19 ground glass and
lobar bacterial pneumonia). Patient factors (sex, age, view AP/PA) change the
anatomy visibly; exposure, tilt, shift and noise are nuisances.

Coordinates: the image is the unit square, x to the right, y down. Radiographic
convention: the patient's right is the image's left. 'Patient' coordinates
undo the patient's small tilt and shift; 'template' coordinates are those of
the lung prior (lungs roughly in x 0.12..0.88, y 0.14..0.70), mapped per
patient by a scale (thorax width and lung height) and an apex height.

Use it without TFDS:

  factors = phantom.sample_factors(np.random.default_rng(0))
  image, lung_mask, all_factors = phantom.render_factors(factors, 256)
  same_patient_ap = phantom.with_factors(factors, view=1)
  all_ap = phantom.sample_factors_with(0, 64, view=1)   # the rest varies

Preview: python -m input_pipeline.phantom --out DIR --num N --size S [--seed K]

Modules: factors (sampling and overriding the factors, factors.csv rows),
anatomy (lung template, patient geometry, bones), findings (the signatures of
the findings and the support device), render (images, lung masks and
structure maps, vectorised), pixels (float32 helpers), cli (the preview).
"""

# The public API, re-exported.
# pylint: disable=g-importing-member,unused-import
from input_pipeline.assets import chestxray14_stats
from input_pipeline.phantom.anatomy import bone_density
from input_pipeline.phantom.anatomy import derived_factors
from input_pipeline.phantom.cli import contact_sheet
from input_pipeline.phantom.factors import AUDIT_SPLIT_STRENGTHS
from input_pipeline.phantom.factors import check_variant
from input_pipeline.phantom.factors import BINARY_FACTORS
from input_pipeline.phantom.factors import CONFOUNDER_TARGETS
from input_pipeline.phantom.factors import CONTINUOUS_FACTORS
from input_pipeline.phantom.factors import DEFAULT_MIN_SEVERITY
from input_pipeline.phantom.factors import DEFAULT_PREVALENCE_FLOOR
from input_pipeline.phantom.factors import DERIVED_FACTORS
from input_pipeline.phantom.factors import example_factors
from input_pipeline.phantom.factors import example_rng
from input_pipeline.phantom.factors import factor_row
from input_pipeline.phantom.factors import GROUND_GLASS
from input_pipeline.phantom.factors import labels_from_severity
from input_pipeline.phantom.factors import sample_factors
from input_pipeline.phantom.factors import sample_factors_with
from input_pipeline.phantom.factors import SCALAR_FACTORS
from input_pipeline.phantom.factors import SIDE_BOTH
from input_pipeline.phantom.factors import SIDE_LEFT
from input_pipeline.phantom.factors import SIDE_NONE
from input_pipeline.phantom.factors import SIDE_RIGHT
from input_pipeline.phantom.factors import SIGNS
from input_pipeline.phantom.factors import split_confounder_strength
from input_pipeline.phantom.factors import split_id
from input_pipeline.phantom.factors import SPLITS
from input_pipeline.phantom.factors import SUPPORT_DEVICE_BASE_RATE
from input_pipeline.phantom.factors import VARIANTS
from input_pipeline.phantom.factors import with_factors
from input_pipeline.phantom.factors import with_finding
from input_pipeline.phantom.render import check_image_size
from input_pipeline.phantom.render import MAX_IMAGE_SIZE
from input_pipeline.phantom.render import MIN_IMAGE_SIZE
from input_pipeline.phantom.render import render_batch
from input_pipeline.phantom.render import render_examples
from input_pipeline.phantom.render import render_factors
