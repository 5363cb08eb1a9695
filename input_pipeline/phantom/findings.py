"""Signatures of the findings and the support device on the phantom.

A signature `_sign_<finding>(sub)` draws on the images of a chunk that carry
it (`sub`, see render._Sub) and returns (opacity of the lung air, extra
density, region drawn, factor on the vessel markings), any of them None.
A planner `_plan_<finding>(rng, geometry, severity, side, factors)` places
its lesions per image from the patient's texture seed (one stream per
signature: adding a finding moves nothing else).
"""

import numpy as np

from input_pipeline.phantom import anatomy
from input_pipeline.phantom import factors as factors_lib
from input_pipeline.phantom import pixels


def _bronchograms(sub, hilum_x, hilum_y, aims):
  """Dark air bronchograms: branches from the hilum at angles (n, K)."""
  ddx = sub.x - pixels.column(hilum_x)
  ddy = sub.y - pixels.column(hilum_y)
  width = max(0.007, 0.7 * sub.pixel)
  branches = np.zeros_like(sub.x)
  for k in range(aims.shape[1]):
    cos_a = pixels.column(np.cos(aims[:, k]))
    sin_a = pixels.column(np.sin(aims[:, k]))
    along = ddx * cos_a + ddy * sin_a
    across = ddx * sin_a - ddy * cos_a
    line = np.exp(-(across * (1 / width)) ** 2) * pixels.ramp(
        along, 0.04, 0.07)
    np.maximum(branches, line, out=branches)
  return branches


def _hilum(g, code):
  hx_t, hy_t = anatomy.HILUM_T[0 if code == factors_lib.SIDE_RIGHT else 1]
  return anatomy.template_to_x(g, hx_t), anatomy.template_to_y(g, hy_t)


def _sign_cardiomegaly(sub):
  # Drawn by the heart's size (see anatomy.geometry); its region is the heart.
  return None, None, sub.heart, None


def _sign_emphysema(sub):
  s = sub.severity
  # Hyperlucent lungs with sparse markings; flat, low domes (geometry).
  return -0.4 * s * sub.lung_field, None, 0.5 * sub.lung_field, 1 - 0.7 * s


def _sign_effusion(sub):
  s = sub.severity
  codes = pixels.column(sub.side_codes)
  right = sub.right
  hemithorax = np.where(
      codes == factors_lib.SIDE_BOTH, True,
      np.where(codes == factors_lib.SIDE_RIGHT, right, ~right))
  hemithorax = hemithorax * pixels.ramp(-sub.sd, -0.02, 0.0)
  lateral = np.clip(np.abs(sub.tx - anatomy.MIDLINE_T) * (1 / 0.38), 0, 1)
  costophrenic = np.where(right, sub.param('dome_top_right'),
                          sub.param('dome_top_left')) + 0.07
  # Meniscus: the fluid surface climbs the lateral chest wall.
  height = 0.13 + 0.2 * s
  surface = costophrenic - height * (0.45 + 0.55 * lateral * lateral)
  fluid = pixels.ramp(sub.ty - surface, 0.0, 0.035) * hemithorax
  fluid *= pixels.ramp(-sub.below_dome, -0.08, -0.02)
  return 0.97 * fluid, 0.25 * fluid, fluid, None


def _sign_pneumothorax(sub):
  s = sub.severity
  codes = pixels.column(sub.side_codes)
  right = sub.right
  # The lung collapses towards its medial base: a rim of air with no lung
  # markings opens along the lateral wall and the apex.
  collapse = 0.18 + 0.22 * s
  anchor_x = np.where(right, 0.43, 0.56)
  anchor_y = 0.6
  collapsed_sd = anatomy.sample_template(
      anchor_x + (sub.tx - anchor_x) / (1 - collapse),
      anchor_y + (sub.ty - anchor_y) / (1 - collapse), sub.chunk.size)
  collapsed_sd *= (1 - collapse) * 0.8
  side = np.where(codes == factors_lib.SIDE_RIGHT, right, ~right).astype(
      np.float32)
  lung = sub.lung_field * side
  gap = lung * pixels.edge(collapsed_sd, sub.pixel)
  line = np.exp(-(collapsed_sd * (1 / max(0.006, 0.6 * sub.pixel))) ** 2)
  line *= lung
  # Pure air in the rim (thicker air column), denser collapsed lung.
  opacity = -0.45 * gap + 0.3 * (lung - gap)
  return opacity, 0.4 * line, gap, 1 - gap


def _lobe_region(sub, lobes):
  ty, tx, edge = sub.ty, sub.tx, 0.5 * sub.pixel
  lobe = pixels.column(lobes)
  # Sharp horizontal fissure.
  upper_right = pixels.ramp(anatomy.FISSURE_T - ty, -edge, edge)
  middle_right = (pixels.ramp(ty - anatomy.FISSURE_T, -edge, edge)
                  * pixels.ramp(0.6 - ty, 0.0, 0.04)
                  * pixels.ramp(tx, 0.2, 0.28))
  upper_left = pixels.ramp(0.5 - ty, 0.0, 0.05)
  lower = pixels.ramp(ty - 0.5, 0.0, 0.06)
  region = np.where(lobe == 0, upper_right,
                    np.where(lobe == 1, middle_right,
                             np.where(lobe == 2, upper_left, lower)))
  return region * sub.lung_field * sub.side_mask()


# Lobes: 0 right upper, 1 right middle, 2 left upper, 3 lower (either side).
_LOBE_CENTRES_T = {0: (0.3, 0.3), 1: (0.33, 0.52), 2: (0.68, 0.32),
                   3: (None, 0.62)}


def _plan_lobar(rng, g, severity, side, factors):
  del severity
  # Right: upper or middle lobe; left: upper lobe. covid3's bacterial
  # pneumonia may also take a lower lobe.
  choices = [0, 1] if side == factors_lib.SIDE_RIGHT else [2]
  if factors['variant'] == 'covid3':
    choices.append(3)
  lobe = choices[int(rng.integers(len(choices)))]
  hx, hy = _hilum(g, side)
  tx_c, ty_c = _LOBE_CENTRES_T[lobe]
  if tx_c is None:
    tx_c = 0.3 if side == factors_lib.SIDE_RIGHT else 0.68
  aim = np.arctan2(anatomy.template_to_y(g, ty_c) - hy,
                   anatomy.template_to_x(g, tx_c) - hx)
  return dict(lobe=lobe, hilum_x=hx, hilum_y=hy,
              aims=aim + rng.uniform(-0.5, 0.5, size=3))


def _sign_consolidation(sub):
  s = sub.severity
  plan = sub.plans(_plan_lobar)
  region = _lobe_region(sub, plan['lobe'])
  opacity = (0.72 + 0.25 * s) * region
  opacity *= 0.88 + 0.12 * np.tanh(sub.low0)
  bronchi = _bronchograms(sub, plan['hilum_x'], plan['hilum_y'], plan['aims'])
  opacity *= 1 - 0.35 * bronchi
  return opacity, 0.06 * opacity, region, None


def _plan_pneumonia(rng, g, severity, side, factors):
  del factors
  cx, cy = anatomy.lesion_centres(rng, g, side, 1, 0.0)
  cy = np.maximum(cy, anatomy.template_to_y(g, 0.42))    # middle / lower zone
  radius = 0.095 + 0.05 * severity
  angles = rng.uniform(0, 2 * np.pi, size=2)
  hx, hy = _hilum(g, side)
  aim = np.arctan2(cy[0] - hy, cx[0] - hx)
  return dict(
      cx=[cx[0], *(cx[0] + 0.9 * radius * np.cos(angles))],
      cy=[cy[0], *(cy[0] + 0.9 * radius * np.sin(angles))],
      radius=[radius, *(radius * rng.uniform(0.4, 0.6, size=2))],
      weight=[1.0, 0.8, 0.8], hilum_x=hx, hilum_y=hy,
      aims=aim + rng.uniform(-0.45, 0.45, size=3))


def _blobs(sub, plan, softness=2.0):
  """Sum of soft round patches from plan 'cx', 'cy', 'radius', 'weight'."""
  total = np.zeros_like(sub.x)
  for k in range(plan['cx'].shape[1]):
    r2 = ((sub.x - pixels.column(plan['cx'][:, k])) ** 2
          + (sub.y - pixels.column(plan['cy'][:, k])) ** 2)
    r2 *= pixels.column(1 / plan['radius'][:, k] ** 2)
    total += pixels.column(plan['weight'][:, k]) * np.exp(
        -r2 ** (softness / 2))
  return total


def _sign_pneumonia(sub):
  s = sub.severity
  plan = sub.plans(_plan_pneumonia)
  patch = _blobs(sub, plan)
  patch *= 1.3 * (1 + 0.3 * np.tanh(sub.low1))
  np.clip(patch, 0, 1, out=patch)
  patch *= sub.lung_field
  opacity = (0.68 + 0.27 * s) * patch
  bronchi = _bronchograms(sub, plan['hilum_x'], plan['hilum_y'], plan['aims'])
  opacity *= 1 - 0.3 * bronchi
  return opacity, 0.05 * opacity, patch, None


_MAX_PATCHES = 8


def _plan_infiltration(rng, g, severity, side, factors):
  del severity, factors
  count = int(rng.integers(4, _MAX_PATCHES + 1))
  cx, cy = anatomy.lesion_centres(rng, g, side, count, -0.02)
  count = len(cx)
  pad = _MAX_PATCHES - count
  return dict(cx=np.pad(cx, (0, pad)), cy=np.pad(cy, (0, pad)),
              radius=np.pad(rng.uniform(0.05, 0.08, size=count), (0, pad),
                            constant_values=1.0),
              weight=np.pad(rng.uniform(0.7, 1.0, size=count), (0, pad)))


def _sign_infiltration(sub):
  s = sub.severity
  patchy = np.clip(_blobs(sub, sub.plans(_plan_infiltration)), 0, 1)
  patchy *= 0.75 + 0.25 * np.tanh(sub.low0)
  patchy *= sub.lung_field
  return (0.58 + 0.3 * s) * patchy, 0.05 * patchy, patchy, None


def _plan_atelectasis(rng, g, severity, side, factors):
  del factors
  hx_t, _ = anatomy.HILUM_T[0 if side == factors_lib.SIDE_RIGHT else 1]
  outward = -1 if side == factors_lib.SIDE_RIGHT else 1
  bands = {key: [] for key in ('ax', 'ay', 'bx', 'by', 'weight')}
  count = int(rng.integers(1, 3))
  for k in range(2):
    # Plate-like band in the lower zone, roughly horizontal.
    cx = anatomy.template_to_x(g, hx_t + outward * rng.uniform(0.04, 0.12))
    cy = anatomy.template_to_y(g, rng.uniform(0.5, 0.56) - 0.07 * k)
    half_length = rng.uniform(0.08, 0.12)
    tilt = rng.uniform(-0.25, 0.25)
    bands['ax'].append(cx - half_length)
    bands['ay'].append(cy - half_length * tilt)
    bands['bx'].append(cx + half_length)
    bands['by'].append(cy + half_length * tilt)
    bands['weight'].append(1.0 if k < count else 0.0)
  bands['thickness'] = 0.011 + 0.006 * severity   # half-thickness
  return bands


def _sign_atelectasis(sub):
  s = sub.severity
  plan = sub.plans(_plan_atelectasis)
  bands = np.zeros_like(sub.x)
  thickness = pixels.column(plan['thickness'])
  for k in range(plan['ax'].shape[1]):
    distance = pixels.segment_distance(
        sub.x, sub.y, *(pixels.column(plan[key][:, k])
                        for key in ('ax', 'ay', 'bx', 'by')))
    band = pixels.ramp(thickness - distance, -sub.pixel, sub.pixel)
    np.maximum(bands, band * pixels.column(plan['weight'][:, k]), out=bands)
  lungs = sub.lung_field * sub.side_mask()
  bands *= lungs
  # Basal wedge of collapsed lung above the raised dome (volume loss).
  wedge = pixels.ramp(-sub.below_dome, -0.045, -0.005) * lungs
  opacity = np.clip(0.9 * bands + (0.35 + 0.3 * s) * wedge, 0, 1)
  return opacity, 0.25 * bands, np.maximum(bands, wedge), None


def _sign_edema(sub):
  s = sub.severity
  haze = np.zeros_like(sub.x)
  for hx_t, hy_t in anatomy.HILUM_T:   # bilateral perihilar "bat wing" haze
    np.maximum(haze, np.exp(-(((sub.tx - hx_t) * (1 / 0.17)) ** 2
                              + ((sub.ty - hy_t) * (1 / 0.15)) ** 2)),
               out=haze)
  haze *= 0.85 + 0.15 * np.tanh(sub.low0)
  haze *= sub.lung_field
  return (0.35 + 0.4 * s) * haze, 0.05 * haze, haze, 1 + 0.5 * haze


def _sign_fibrosis(sub):
  s = sub.severity
  # Reticular net: the zero crossings of smooth noise; peripheral and basal,
  # with volume loss (geometry).
  reticulum = pixels.smooth_normalised(sub.texture,
                                       max(0.7, 0.007 * sub.chunk.size))
  net = np.exp(-(reticulum * (1 / 0.3)) ** 2)
  periphery = 1 - pixels.ramp(-sub.sd, 0.03, 0.14)
  weight = (0.35 + 0.65 * periphery) * (
      0.3 + 0.7 * pixels.ramp(sub.ty, 0.3, 0.6))
  weight *= sub.lung_field
  opacity = ((0.25 + 0.25 * s) * net + (0.22 + 0.18 * s)) * weight
  return opacity, 0.1 * net * weight, weight, None


def _sign_pleural_thickening(sub):
  s = sub.severity
  thickness = (0.028 + 0.024 * s) * (1 + 0.25 * np.tanh(sub.low1))
  # A rind inside the lateral chest wall and over the apex.
  where = np.maximum(
      pixels.ramp(np.abs(sub.tx - anatomy.MIDLINE_T), 0.22, 0.3),
      pixels.ramp(0.3 - sub.ty, 0.0, 0.06))
  rind = pixels.edge(thickness + sub.sd, sub.pixel)
  rind *= where
  rind *= sub.thorax
  rind *= sub.side_mask()
  rind *= pixels.ramp(-sub.below_dome, -0.01, 0.0)
  return 0.97 * rind, 0.4 * rind, rind, None


def _round_lesion_planner(counts, count_weights, radius_fn):
  def plan(rng, g, severity, side, factors):
    del factors
    count = int(rng.choice(counts, p=count_weights))
    maximum = max(counts)
    if side == factors_lib.SIDE_BOTH:
      count = max(count, 2)
      sides = [factors_lib.SIDE_RIGHT, factors_lib.SIDE_LEFT] + [
          factors_lib.SIDE_RIGHT + int(rng.integers(2))
          for _ in range(maximum)]
    else:
      sides = [side] * maximum
    radius = radius_fn(severity)
    rows = dict(cx=[], cy=[], radius=[], weight=[], phase2=[], phase3=[])
    for k in range(maximum):
      cx, cy = anatomy.lesion_centres(rng, g, sides[k], 1, radius)
      rows['cx'].append(cx[0])
      rows['cy'].append(cy[0])
      rows['radius'].append(radius * rng.uniform(0.9, 1.1))
      rows['weight'].append(1.0 if k < count else 0.0)
      rows['phase2'].append(rng.uniform(0, 2 * np.pi))
      rows['phase3'].append(rng.uniform(0, 2 * np.pi))
    return rows
  return plan


def _round_lesions(sub, plan, lobulation):
  lesion = np.zeros_like(sub.x)
  for k in range(plan['cx'].shape[1]):
    ddx = sub.x - pixels.column(plan['cx'][:, k])
    ddy = sub.y - pixels.column(plan['cy'][:, k])
    distance = np.sqrt(ddx * ddx + ddy * ddy) + 1e-6
    local = pixels.column(plan['radius'][:, k])
    if lobulation:
      cos_t, sin_t = ddx / distance, ddy / distance
      cos2, sin2 = cos_t * cos_t - sin_t * sin_t, 2 * sin_t * cos_t
      cos3 = 4 * cos_t ** 3 - 3 * cos_t
      sin3 = 3 * sin_t - 4 * sin_t ** 3
      p2, p3 = plan['phase2'][:, k], plan['phase3'][:, k]
      wobble = (0.6 * (cos2 * pixels.column(np.cos(p2))
                       - sin2 * pixels.column(np.sin(p2)))
                + cos3 * pixels.column(np.cos(p3))
                - sin3 * pixels.column(np.sin(p3)))
      local = local * (1 + lobulation * wobble)
    sphere = np.sqrt(np.clip(1 - (distance / local) ** 2, 0, 1))
    sphere *= 0.6
    sphere += 0.4 * pixels.edge(local - distance, sub.pixel)
    np.maximum(lesion, sphere * pixels.column(plan['weight'][:, k]), out=lesion)
  lesion *= sub.thorax
  lesion *= sub.above_dome
  return lesion


# Nodule: ~4.3-4.7 px across at 64 px (radius 0.034..0.037 of the image
# side); mass: 11-13 px.
_plan_nodules = _round_lesion_planner((1, 2, 3), (0.4, 0.4, 0.2),
                                      lambda s: 0.031 + 0.006 * s)
_plan_mass = _round_lesion_planner((1,), (1.0,), lambda s: 0.07 + 0.035 * s)


def _sign_nodule(sub):
  lesion = _round_lesions(sub, sub.plans(_plan_nodules), 0.0)
  return 0.95 * lesion, (0.6 + 0.25 * sub.severity) * lesion, lesion, None


def _sign_mass(sub):
  lesion = _round_lesions(sub, sub.plans(_plan_mass), 0.06)
  return 0.97 * lesion, (0.6 + 0.2 * sub.severity) * lesion, lesion, None


def _sign_hernia(sub):
  s = sub.severity
  # Retrocardiac sac with a gas cap over an air-fluid level.
  radius = 0.085 + 0.04 * s
  cx = 0.53
  cy = sub.param('gastric_y') - 0.125
  distance = np.sqrt((sub.x - cx) ** 2 + (sub.y - cy) ** 2)
  sac = np.sqrt(np.clip(1 - (distance / radius) ** 2, 0, 1))
  sac *= 0.6
  sac += 0.4 * pixels.edge(radius - distance, sub.pixel)
  gas = sac * pixels.edge(cy - sub.y, sub.pixel)     # gas above the fluid level
  return 0.95 * sac * sub.lung_field, 0.5 * sac - 1.0 * gas, sac, None


def _sign_ground_glass(sub):
  s = sub.severity
  # Bilateral, peripheral, basal, patchy haze; vessels stay visible.
  ggo = 1 - pixels.ramp(-sub.sd, 0.04, 0.13)
  ggo *= 0.35 + 0.65 * pixels.ramp(sub.ty, 0.25, 0.55)
  ggo *= 0.45 + 0.55 * pixels.ramp(
      np.tanh(sub.low0) + 0.6 * np.tanh(sub.low1), -0.6, 0.4)
  ggo *= sub.lung_field
  return (0.3 + 0.35 * s) * ggo, None, ggo, None


def _plan_device(rng, g, severity, side, factors):
  del severity, side, factors
  apex, half = g['apex_y'], g['lung_half_width']
  jitter = rng.uniform(-0.02, 0.02, size=(3, 2))
  ex = np.array([0.5 - 0.75 * half, 0.5 + 0.75 * half, 0.5 + 0.85 * half])
  ey = np.array([apex + 0.06, apex + 0.06, apex + 0.5])
  ex, ey = ex + jitter[:, 0], ey + jitter[:, 1]
  return dict(ex=ex, ey=ey, lx=ex + 0.12 * np.sign(ex - 0.5), ly=ey - 0.2,
              apex=apex)


def support_device(sub):
  """ECG electrodes with leads and a right-sided central line (very dense)."""
  plan = sub.plans(_plan_device)
  x, y, pixel = sub.x, sub.y, sub.pixel
  width = max(0.006, 0.55 * pixel)
  device = np.zeros_like(x)
  for k in range(3):
    ex, ey = pixels.column(plan['ex'][:, k]), pixels.column(plan['ey'][:, k])
    distance = np.sqrt((x - ex) ** 2 + (y - ey) ** 2)
    np.maximum(device, 0.6 * pixels.edge(0.02 - distance, pixel), out=device)
    np.maximum(device, pixels.edge(width - np.abs(distance - 0.02), pixel),
               out=device)
    lead = pixels.segment_distance(x, y, ex, ey,
                                   pixels.column(plan['lx'][:, k]),
                                   pixels.column(plan['ly'][:, k]))
    np.maximum(device, 0.8 * pixels.edge(width - lead, pixel), out=device)
  # Central line: from the right neck base down to the cavoatrial junction.
  apex = pixels.column(plan['apex'])
  points = ((0.28, -0.06), (0.41, 0.04), (0.455, 0.14), (0.465, 0.27))
  for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
    distance = pixels.segment_distance(x, y, ax, apex + ay, bx, apex + by)
    np.maximum(device, pixels.edge(width - distance, pixel), out=device)
  return 0.9 * device


# Signature of each of SIGNS, in drawing order.
SIGNATURES = {
    'Cardiomegaly': _sign_cardiomegaly,
    'Emphysema': _sign_emphysema,
    'Fibrosis': _sign_fibrosis,
    'Edema': _sign_edema,
    factors_lib.GROUND_GLASS: _sign_ground_glass,
    'Infiltration': _sign_infiltration,
    'Pneumonia': _sign_pneumonia,
    'Consolidation': _sign_consolidation,
    'Atelectasis': _sign_atelectasis,
    'Effusion': _sign_effusion,
    'Pleural_Thickening': _sign_pleural_thickening,
    'Pneumothorax': _sign_pneumothorax,
    'Nodule': _sign_nodule,
    'Mass': _sign_mass,
    'Hernia': _sign_hernia,
}
