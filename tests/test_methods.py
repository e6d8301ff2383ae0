"""The benchmark table's newer terms (issue 20) against their formulas written out in float64 Python, their
schedules, and what they refuse."""
from __future__ import annotations

import json
import math

import pytest
import torch

from softcache.errors import SoftcacheError
from softcache.losses import DistillLoss, KDLoss, resolve_options, resolve_weights
from softcache.losses.logit import DISTLoss, DKDLoss, LearnedTemperature, standardize, teacher_logits
from softcache.losses.response import CELoss


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(x / t for x in row)
    e = [math.exp(x / t - m) for x in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(11)
    s, t = (torch.randn(6, 7, generator=g, dtype=torch.float64) * scale for scale in (2, 3))
    return s, t, torch.tensor([0, 3, 6, 2, 2, 5])


def _dkd_by_hand(s, t, y, temperature, alpha, beta):
    tckd = nckd = 0.0
    for row_s, row_t, c in zip(s.tolist(), t.tolist(), y.tolist()):
        p_s, p_t = _softmax(row_s, temperature), _softmax(row_t, temperature)
        tckd += _kl([p_t[c], 1 - p_t[c]], [p_s[c], 1 - p_s[c]])
        rest_s = [p / (1 - p_s[c]) for j, p in enumerate(p_s) if j != c]  # the distribution over the other classes
        rest_t = [p / (1 - p_t[c]) for j, p in enumerate(p_t) if j != c]
        nckd += _kl(rest_t, rest_s)
    return temperature ** 2 * (alpha * tckd + beta * nckd) / len(y)


def test_dkd_matches_its_target_and_non_target_split_written_out(logits):
    s, t, y = logits
    for temperature, alpha, beta in ((4.0, 1.0, 8.0), (2.0, 0.5, 2.0)):
        got = DKDLoss(temperature, alpha=alpha, beta=beta)(s.float(), t.float(), y).item()
        assert got == pytest.approx(_dkd_by_hand(s, t, y, temperature, alpha, beta), rel=1e-5)
    # alpha = beta = 1 is not KD (the split drops the cross terms), but with one class left over it is
    assert DKDLoss(4.0, alpha=1.0, beta=1.0)(s[:, :2].float(), t[:, :2].float(), y % 2).item() == pytest.approx(
        KDLoss(4.0)(s[:, :2].float(), t[:, :2].float()).item(), rel=1e-5)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (z - mb) for x, z in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((z - mb) ** 2 for z in b)))


def test_dist_matches_inter_and_intra_class_pearson_written_out(logits):
    s, t, y = logits
    tau, beta, gamma = 4.0, 1.0, 1.0
    y_s = [_softmax(r, tau) for r in s.tolist()]
    y_t = [_softmax(r, tau) for r in t.tolist()]
    inter = sum(1 - _pearson(a, b) for a, b in zip(y_s, y_t)) / len(y_s)
    cols = range(len(y_s[0]))
    intra = sum(1 - _pearson([r[k] for r in y_s], [r[k] for r in y_t]) for k in cols) / len(cols)
    expected = tau ** 2 * (beta * inter + gamma * intra)
    assert DISTLoss(tau, beta, gamma)(s.float(), t.float(), y).item() == pytest.approx(expected, rel=1e-5)
    assert DISTLoss()(s.float(), s.float(), y).item() == pytest.approx(0.0, abs=1e-4)  # float32 rounding: 1e-5


def test_standardized_kd_is_kd_of_the_standardized_logits_written_out(logits):
    s, t, y = logits

    def by_hand(row):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((x - m) ** 2 for x in row) / (len(row) - 1))  # Bessel's correction, as torch.std
        return [(x - m) / (sd + 1e-7) for x in row]

    torch.testing.assert_close(standardize(s).double(), torch.tensor([by_hand(r) for r in s.tolist()],
                                                                     dtype=torch.float64), rtol=1e-6, atol=1e-6)
    temperature = 2.0
    expected = temperature ** 2 * sum(_kl(_softmax(by_hand(rt), temperature), _softmax(by_hand(rs), temperature))
                                      for rs, rt in zip(s.tolist(), t.tolist())) / len(s)
    criterion = DistillLoss({"kd": 1.0}, temperature=temperature, standardize=True)
    assert criterion(s.float(), y, {}, t.float(), {})["kd"].item() == pytest.approx(expected, rel=1e-5)
    # invariant to each logit row's scale and shift, which plain KD is not
    shifted = criterion(3 * s.float() + 1, y, {}, 0.5 * t.float() - 2, {})["kd"].item()
    assert shifted == pytest.approx(expected, rel=1e-4)
    assert DistillLoss({"kd": 1.0}, temperature=temperature)(3 * s.float() + 1, y, {}, t.float(), {})[
        "kd"].item() != pytest.approx(expected, rel=1e-2)


def test_learned_temperature_starts_at_the_reference_value_and_reverses_its_gradient():
    module = LearnedTemperature()
    assert module().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    lams = []
    for epoch in range(12):
        module.set_epoch(epoch)
        lams.append(module.lam)
    assert lams[0] == pytest.approx((1 - math.cos(math.pi / 10)) / 2) and lams[4] == pytest.approx(0.5)
    assert lams[9] == lams[11] == 1.0 and lams == sorted(lams)
    # the gradient reaching theta is -lambda times the plain one: the temperature ascends the KD loss
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    module.set_epoch(2)
    KDLoss()(s, t, temperature=module()).backward()
    theta = torch.tensor(1.0, requires_grad=True)
    KDLoss()(s, t, temperature=1 + 20 * torch.sigmoid(theta)).backward()
    assert module.theta.grad.item() == pytest.approx(-module.lam * theta.grad.item(), rel=1e-5)
    assert theta.grad.item() != 0


def test_learned_temperature_trains_with_kd_and_dkd_in_the_criterion(logits):
    s, t, y = logits
    criterion = DistillLoss({"ce": 0.1, "kd": 0.9, "dkd": 1.0}, learn_temperature=True,
                            options={"dkd": {"warmup": 0}})
    assert [name for name, _ in criterion.named_parameters()] == ["temperature_module.theta"]
    criterion.set_epoch(5)
    temperature = criterion.temperature_module().item()
    out = criterion(s.float(), y, {}, t.float(), {})
    assert out["kd"].item() == pytest.approx(0.9 * KDLoss(temperature)(s.float(), t.float()).item(), rel=1e-5)
    assert out["dkd"].item() == pytest.approx(DKDLoss(temperature)(s.float(), t.float(), y).item(), rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(criterion.temperature_module.theta.grad)


def test_label_smoothing_matches_the_smoothed_targets_written_out(logits):
    s, _, y = logits
    eps, k = 0.1, s.shape[1]
    expected = 0.0
    for row, c in zip(s.tolist(), y.tolist()):
        log_p = [math.log(p) for p in _softmax(row)]
        expected -= sum(((1 - eps) * (j == c) + eps / k) * lp for j, lp in enumerate(log_p))
    assert CELoss(eps)(s.float(), y).item() == pytest.approx(expected / len(y), rel=1e-5)
    partner, lam = torch.roll(y, 1), torch.full((6,), 0.25)
    mixed = CELoss(eps)(s.float(), y, (partner, lam)).item()
    own = torch.nn.functional.cross_entropy(s.float(), y, reduction="none", label_smoothing=eps)
    other = torch.nn.functional.cross_entropy(s.float(), partner, reduction="none", label_smoothing=eps)
    assert mixed == pytest.approx((0.25 * own + 0.75 * other).mean().item(), rel=1e-6)


def test_dkd_warms_up_over_its_epochs_as_mdistiller_does(logits):
    s, t, y = logits
    criterion = DistillLoss({"ce": 1.0, "dkd": 1.0})  # warm-up 20 epochs by default
    full = DKDLoss()(s.float(), t.float(), y).item()
    seen = []
    for epoch in (0, 9, 19, 30):
        criterion.set_epoch(epoch)
        seen.append(criterion(s.float(), y, {}, t.float(), {})["dkd"].item())
    assert seen == pytest.approx([full / 20, full / 2, full, full], rel=1e-6)
    criterion = DistillLoss({"ce": 1.0, "dkd": 1.0}, options=resolve_options({"ce": 1, "dkd": 1},
                                                                             [("dkd.warmup", 0.0), ("dkd.beta", 2.0)]))
    assert criterion(s.float(), y, {}, t.float(), {})["dkd"].item() == pytest.approx(
        DKDLoss(beta=2.0)(s.float(), t.float(), y).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["dkd", "dist"])
def test_logit_terms_have_finite_gradients_on_a_repeated_sample(name):
    s = torch.randn(6, 10)
    s[1] = s[0]
    s[:, 4] = 0.5  # a class every sample scores alike: its intra-class correlation is undefined
    s.requires_grad_(True)
    t = torch.randn(6, 10)
    t[:, 4] = 1.0
    out = DistillLoss({name: 1.0}, options={name: {"warmup": 0}} if name == "dkd" else None)(
        s, torch.tensor([0, 0, 1, 2, 3, 4]), {}, t, {})
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_an_ensembles_mean_distribution_stands_for_the_teachers_logits(logits):
    """`--teachers mean` targets carry log p̄ at T; T log p̄ has the same softmax at every temperature up to a
    constant, so DKD and DIST computed from it equal those from logits."""
    s, t, y = logits
    log_p = torch.log_softmax(t.float() / 4.0, dim=1)
    z = teacher_logits({"log_p": log_p}, 4.0)
    assert torch.allclose(z - z.mean(1, keepdim=True), t.float() - t.float().mean(1, keepdim=True), atol=1e-5)
    for term in (DKDLoss(), DISTLoss()):
        assert term(s.float(), z, y).item() == pytest.approx(term(s.float(), t.float(), y).item(), rel=1e-5)
    assert teacher_logits({"topk_values": t}, 4.0) is None


def test_full_logit_terms_are_refused_with_compact_caches():
    from softcache.train import check_full_logits
    weights = resolve_weights(["ce", "dkd"], alpha=0.9, beta=1.0, hint_weight=1.0)
    for fmt in ("topk", "sampled"):
        with pytest.raises(SoftcacheError, match=f"dkd needs the teacher's full logits, and this cache stores {fmt} "
                                                 "logits .*; dump with --logits fp16"):
            check_full_logits(weights, {}, fmt)
    with pytest.raises(SoftcacheError, match="--kd-standardize needs the teacher's full logits"):
        check_full_logits({"ce": 0.1, "kd": 0.9}, {"standardize": True}, "topk")
    with pytest.raises(SoftcacheError, match="--learn-temperature needs the teacher's full logits"):
        check_full_logits({"ce": 0.1, "kd": 0.9}, {"learn_temperature": True}, "sampled")
    check_full_logits({"ce": 0.1, "kd": 0.9}, {}, "topk")     # KD from top-K is exact over its buckets
    check_full_logits(weights, {"standardize": True}, "fp16")


# --- every new term trains from one cache through the CLI, and --help lists the settings with their defaults

_CLI_RUNS = {"dkd+dist": ["--loss", "ce,dkd,dist", "--label-smoothing", "0.1", "--loss-option", "dkd.beta=2",
                          "--loss-option", "dist.tau=1"],
             "kd-standardized-learned-t": ["--loss", "kd,dkd", "--kd-standardize", "--learn-temperature",
                                           "--temperature", "2"],
             "features": ["--loss", "ce,vid,gram,fsp,kdsvd,cc", "--pair", "layer2=layer2", "--pair", "layer3=layer3",
                          "--pair", "embedding=embedding", "--loss-option", "vid.init_var=3",
                          "--loss-option", "fsp.init_epochs=0"],
             "ofd": ["--loss", "ce,ofd", "--pair", "ofd:layer2.pre_relu=layer2.pre_relu", "--pair",
                     "ofd:layer3.pre_relu=layer3.pre_relu"],
             "simkd": ["--loss", "simkd", "--pair", "layer3=layer3"],
             "gat": ["--loss", "ce,gat", "--beta", "100"],
             "staged": ["--loss", "ce,ab,ft", "--pair", "ab:layer2.pre_relu=layer2.pre_relu", "--pair",
                        "ab:layer3.pre_relu=layer3.pre_relu", "--pair", "ft:layer3=layer3",
                        "--loss-option", "ab.init_epochs=1", "--loss-option", "ft.init_epochs=1"],
             "reviewkd": ["--loss", "ce,reviewkd", "--pair", "layer2=layer2.pre_relu", "--pair",
                          "layer3=layer3.pre_relu", "--pair", "embedding=embedding",
                          "--loss-option", "reviewkd.warmup=1"]}


@pytest.fixture(scope="module")
def stages_cache(tmp_path_factory, teacher_weights):
    """synthetic:20, 3 views: logits, layer2 and layer3 (after and before their ReLU), the embedding, the
    input-gradient maps; the teacher's classifier once."""
    from conftest import load_teacher
    from softcache.data import load_source
    from softcache.dump import dump_teacher
    from softcache.views import Augment
    out = tmp_path_factory.mktemp("stages") / "cache"
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:20", "train"), out,
                 augment=Augment("cifar", image_size=32), views=3,
                 layers=["layer2", "layer3", "layer2.pre_relu", "layer3.pre_relu", "embedding", "input_gradient"],
                 seed=1, batch_size=32, workers=0, teacher_info={"arch": "resnet8", "weights_sha256": "test"},
                 teacher_head=True)
    return out


@pytest.mark.parametrize("run", list(_CLI_RUNS))
def test_every_new_term_trains_from_one_cache_through_the_cli(tmp_path, stages_cache, run):
    import json

    from helpers import invoke
    args = _CLI_RUNS[run]
    result = invoke("train-student", "--cache", stages_cache, "--student", "resnet8", "--epochs", "2", "--workers", "0",
                    "--batch-size", "8", "--out", tmp_path / run, *args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    terms = args[args.index("--loss") + 1].split(",")
    assert {f"train_{t}" for t in terms} <= {key for r in records for key in r}  # init terms in the init epochs
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("train_")), records
    config = json.loads((tmp_path / run / "config.json").read_text())
    assert config["loss_options"] == [[a.partition("=")[0], float(a.partition("=")[2])]
                                      for a, b in zip(args[1:], args) if b == "--loss-option"]
    if "--learn-temperature" in args:  # the run records both settings
        assert config["learn_temperature"] and config["kd_standardize"]


def test_train_student_help_lists_every_terms_settings_with_defaults():
    from helpers import invoke
    text = " ".join(invoke("train-student", "--help").output.split())
    for needle in ("dkd: alpha=1, beta=8, warmup=20", "dist: tau=4, beta=1, gamma=1", "--kd-standardize",
                   "--learn-temperature", "--label-smoothing", "dkd", "dist"):
        assert needle in text, needle


# --- feature terms: each against its formula in float64 NumPy, written independently of the module

def _np(x):
    return x.detach().double().numpy()


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 2, 2, generator=g),
            torch.randn(4, 5, 4, 4, generator=g))


def test_gram_matches_channel_gram_matrices_written_out(maps):
    import numpy as np

    from softcache.losses.features import GramLoss
    s, t, _ = maps
    expected = 0.0
    for fs, ft in zip(_np(s), _np(t)):
        gs = np.array([[np.sum(fs[i] * fs[j]) / 16 for j in range(3)] for i in range(3)])
        gt = np.array([[np.sum(ft[i] * ft[j]) / 4 for j in range(3)] for i in range(3)])
        expected += np.sum((gs - gt) ** 2)
    assert GramLoss()(s, t).item() == pytest.approx(expected / 4 / 9, rel=1e-5)  # mean over B and the C^2 entries


def test_vid_matches_the_gaussian_likelihood_written_out(maps):
    import numpy as np

    from softcache.losses.features import VIDLoss
    s, _, t = maps
    vid = VIDLoss(3, 5)
    w1, w2, w3 = (_np(vid.regressor[i].weight)[:, :, 0, 0] for i in (0, 2, 4))
    var = np.log1p(np.exp(_np(vid.log_scale))) + 1e-5
    assert var == pytest.approx(np.full(5, 5.0))          # sigma^2 starts at 5
    x = _np(s).transpose(0, 2, 3, 1)                       # [B, H, W, C]
    mu = np.maximum(np.maximum(x @ w1.T, 0) @ w2.T, 0) @ w3.T
    target = _np(t).transpose(0, 2, 3, 1)
    expected = np.mean(0.5 * ((mu - target) ** 2 / var + np.log(var)))
    assert vid(s, t).item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        vid.log_scale += 1.0
    vid(s, t).backward()
    assert vid.log_scale.grad.abs().sum() > 0              # the variances train


def test_cc_matches_consecutive_gap_products_written_out():
    import numpy as np

    from softcache.losses.relations import CCLoss
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(5, 6, generator=g), torch.randn(5, 9, generator=g)
    cc = CCLoss(6, 9)
    es = _np(s) @ _np(cc.embed_s.weight).T + _np(cc.embed_s.bias)
    et = _np(t) @ _np(cc.embed_t.weight).T + _np(cc.embed_t.bias)
    delta = np.abs(es - et)
    expected = np.mean([np.sum(delta[i - 1] * delta[i]) for i in range(1, 5)])
    assert cc(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_fsp_matches_flow_matrices_written_out():
    import numpy as np

    from softcache.losses.stages import FSPLoss
    g = torch.Generator().manual_seed(9)
    student = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    teacher = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]

    def flow(bottom, top):  # bottom pooled 2x2 to top's size; G[i, j] = mean_pos top_i * bottom_j
        b = bottom.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))
        return np.einsum("bjhw,bihw->bij", b, top) / 4

    g_s, g_t = flow(*map(_np, student)), flow(*map(_np, teacher))
    assert FSPLoss()(student, teacher).item() == pytest.approx(np.mean((g_s - g_t) ** 2), rel=1e-5)


def test_kdsvd_matches_singular_vector_relations_computed_in_float64():
    import numpy as np

    from softcache.losses.stages import KDSVDLoss
    g = torch.Generator().manual_seed(10)
    shapes = [(3, 4, 5, 5), (3, 6, 3, 3)]
    student = [torch.randn(*sh, generator=g) for sh in shapes]
    teacher = [torch.randn(*sh, generator=g) for sh in shapes]

    def vectors(f, n):
        b, c, h, w = f.shape
        _, sv, vh = np.linalg.svd(f.reshape(b, c, h * w).transpose(0, 2, 1), full_matrices=False)
        v = vh.transpose(0, 2, 1)[:, :, :n]
        sv = sv[:, :n]
        return sv / np.linalg.norm(sv, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)

    expected, previous = 0.0, None
    for f_s, f_t in zip(map(_np, student), map(_np, teacher)):
        s_t, v_t = vectors(f_t, 1)
        _, v_s = vectors(f_s, 4)
        aligned = np.zeros_like(v_t)
        for b in range(3):                                 # the student vector of largest |cos|, signed
            cos = v_s[b].T @ v_t[b, :, 0]
            best = np.argmax(np.abs(cos))
            aligned[b, :, 0] = v_s[b, :, best] * np.sign(cos[best])
        v_t, v_s = v_t * s_t[:, None], aligned * s_t[:, None]
        if previous is not None:
            r_s = np.exp(-(v_s[:, :, None] - previous[0][:, None]) ** 2 / 8)
            r_t = np.exp(-(v_t[:, :, None] - previous[1][:, None]) ** 2 / 8)
            expected += np.sum((r_s - r_t) ** 2) / 3
        previous = (v_s, v_t)
    assert KDSVDLoss()(student, teacher).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["gram", "vid", "cc", "fsp", "kdsvd"])
def test_feature_terms_have_finite_gradients_on_a_repeated_sample(name):
    torch.manual_seed(0)
    vector = name == "cc"
    shapes = [(6, 5)] if vector else [(6, 4, 4, 4), (6, 8, 2, 2)]
    student = [torch.randn(sh) for sh in shapes]
    for f in student:
        f[1] = f[0]
        f.requires_grad_(True)
    teacher = [torch.randn(6, 7)] if vector else [torch.randn(sh) for sh in shapes]
    routes = {name: [(f"s{i}", f"t{i}") for i in range(len(shapes) if name in ("fsp", "kdsvd") else 1)]}
    channels = {(f"s{i}", f"t{i}"): (student[i].shape[1], teacher[i].shape[1]) for i in range(len(shapes))}
    criterion = DistillLoss({name: 1.0}, routes=routes, channels=channels)
    out = criterion(torch.randn(6, 10), torch.arange(6) % 3, {f"s{i}": f for i, f in enumerate(student)},
                    torch.randn(6, 10), {f"t{i}": f for i, f in enumerate(teacher)})
    out["loss"].backward()
    assert torch.isfinite(student[0].grad).all() and student[0].grad.abs().sum() > 0


def test_equal_width_terms_and_joint_terms_refuse_what_they_cannot_relate():
    from softcache.losses import route_pairs
    with pytest.raises(SoftcacheError, match="gram compares channel by channel, and --pair a=b pairs 4 student "
                                             "channels with 6 teacher channels; pair layers of equal width"):
        DistillLoss({"gram": 1.0}, routes={"gram": [("a", "b")]}, channels={("a", "b"): (4, 6)})
    with pytest.raises(SoftcacheError, match=r"fsp relates consecutive stages, and has one --pair \(layer3=layer3\); "
                                             "give it two or more"):
        route_pairs(["ce", "fsp"], [("layer3", "layer3")], {("layer3", "layer3"): "map"})


# --- pre-ReLU taps and ReviewKD

@pytest.mark.parametrize("name, layer", [("resnet8", "layer3"), ("resnet18", "layer4"),
                                         ("timm:resnet18,zero_init_last=false", "layer3")])  # timm: no zeroed BN
def test_a_pre_relu_tap_is_the_stage_output_before_its_final_relu(name, layer):
    from softcache.models import Tapped, build_model, pre_relu_module
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    tapped = Tapped(model, [layer, f"{layer}.pre_relu"])
    with torch.no_grad():
        _, features = tapped(torch.randn(2, 3, 64, 64))
    pre, post = features[f"{layer}.pre_relu"], features[layer]
    assert pre.shape == post.shape and torch.equal(torch.relu(pre), post)
    assert (pre < 0).any()                       # what the ReLU removed is there
    assert pre_relu_module(model, f"{layer}.pre_relu").startswith(f"{layer}.")


def test_a_layer_without_a_relu_module_or_an_unknown_one_is_refused():
    from softcache.models import check_layers, build_model
    model = build_model("resnet8", 10)
    with pytest.raises(SoftcacheError, match=r"'fc.pre_relu': fc \(Linear\) has no nn.ReLU module, so its output "
                                             "before the final ReLU cannot be tapped"):
        check_layers(model, ["fc.pre_relu"])
    with pytest.raises(SoftcacheError, match=r"unknown layer 'layer9\.pre_relu'"):
        check_layers(model, ["layer9.pre_relu"])


def test_hierarchical_context_loss_matches_pooled_mses_written_out():
    import numpy as np

    from softcache.losses.stages import hierarchical_context_loss
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    a, b = _np(s), _np(t)

    def pool(x, k):  # average pooling of an 8x8 map to k x k
        return x.reshape(2, 3, k, 8 // k, k, 8 // k).mean((3, 5))

    levels = [np.mean((a - b) ** 2)] + [np.mean((pool(a, k) - pool(b, k)) ** 2) for k in (4, 2, 1)]
    weights = [1, 0.5, 0.25, 0.125]
    expected = sum(w * v for w, v in zip(weights, levels)) / sum(weights)
    assert hierarchical_context_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    small = hierarchical_context_loss(s[:, :, :1, :1], t[:, :, :1, :1]).item()   # a 1x1 level: the MSE alone
    assert small == pytest.approx(np.mean((a[:, :, :1, :1] - b[:, :, :1, :1]) ** 2), rel=1e-5)


def test_reviewkd_fuses_deep_to_shallow_into_the_teachers_shapes():
    from softcache.losses.stages import ReviewKDLoss
    torch.manual_seed(0)
    review = ReviewKDLoss([(16, 32), (32, 64), (32, 64)])
    assert [f.att_conv is None for f in review.fusions] == [False, False, True]   # the deepest does not fuse
    assert review.fusions[0].conv1[0].out_channels == 32                          # min(512, deepest width)
    student = [torch.randn(4, 16, 8, 8, requires_grad=True), torch.randn(4, 32, 4, 4), torch.randn(4, 32)]
    teacher = [torch.randn(4, 32, 16, 16), torch.randn(4, 64, 8, 8), torch.randn(4, 64)]
    loss = review(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and student[0].grad.abs().sum() > 0
    outputs, deeper = [], None       # the same loss from the levels' outputs, deepest first
    maps = [student[0], student[1], student[2][:, :, None, None]]
    for k in (2, 1, 0):
        out, deeper = review.fusions[k](maps[k], deeper, teacher[k].shape[-2:] if k < 2 else (1, 1))
        outputs.insert(0, out)
    assert [o.shape for o in outputs] == [(4, 32, 16, 16), (4, 64, 8, 8), (4, 64, 1, 1)]


# --- the initialisation stage: ab, fsp, ft (RepDistiller's init()) and two-stage FitNets (the seed's)

def _staged_run(cache, out, losses, pairs, options, epochs=1):
    """A train-student run recording, after every step, its terms and copies of the student's fc and conv1."""
    from softcache.config import OptimConfig
    from softcache.data import load_source
    from softcache.models import build_model
    from softcache.train import train_student
    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    steps = []
    weights = resolve_weights(losses, alpha=0.9, beta=1000.0, hint_weight=100.0)
    train_student(student, cache, load_source("synthetic:20", "train"), load_source("synthetic:20", "test"), out,
                  weights=weights, pairs=pairs, optim=OptimConfig(epochs=epochs, batch_size=10, workers=0),
                  settings={"options": resolve_options(weights, options)},
                  on_step=lambda step, terms: steps.append((terms, student.fc.weight.detach().clone(),
                                                            student.conv1[0].weight.detach().clone())))
    return steps


def test_two_stage_fitnets_trains_the_hint_alone_then_the_task_alone(tmp_path, stages_cache):
    import json
    initial = _staged_run(stages_cache, tmp_path / "x", ["kd", "fitnets"], [("layer2", "layer2")], [])[0]
    steps = _staged_run(stages_cache, tmp_path / "two", ["kd", "fitnets"], [("layer2", "layer2")],
                        [("fitnets.init_epochs", 1.0)])
    assert len(steps) == 4                                              # 1 init + 1 main epoch of 2 steps
    (first, fc0, conv0), (_, fc1, conv1) = steps[:2]
    assert set(first) == {"fitnets", "loss"} and first["loss"] == first["fitnets"]   # the hint alone, unweighted
    assert torch.equal(fc0, fc1) and not torch.equal(conv0, conv1)     # layers up to the hint train, fc does not
    assert set(steps[2][0]) == {"ce", "kd", "loss"}                    # then the task loss, without the hint
    assert first["fitnets"] * 100 == pytest.approx(initial[0]["fitnets"], rel=1e-5)  # same first step, weight 1
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage", "main") for r in records] == ["init", "main"]
    assert records[0]["lr"] == records[1]["lr"] == 0.1                   # the peak rate, then the cosine from it
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["epochs"] == 2


def test_ft_pretrains_its_paraphraser_then_transfers_factors(tmp_path, stages_cache):
    steps = _staged_run(stages_cache, tmp_path / "ft", ["ce", "ft"], [("layer3", "layer3")], [("ft.init_epochs", 1.0)])
    (first, fc0, conv0), (second, fc1, conv1) = steps[:2]  # the init epoch's two steps
    assert set(first) == {"ft", "loss"}
    assert torch.equal(fc0, fc1) and torch.equal(conv0, conv1)         # the student plays no part in it
    assert second["ft"] < first["ft"]                                   # the reconstruction improves
    assert set(steps[2][0]) == {"ce", "ft", "loss"}                     # then FT itself beside ce


@pytest.mark.parametrize("term", ["ab", "fsp"])
def test_ab_and_fsp_train_alone_first_then_leave_the_task_loss_alone(tmp_path, stages_cache, term):
    pairs = [("layer2.pre_relu", "layer2.pre_relu"), ("layer3.pre_relu", "layer3.pre_relu")] if term == "ab" else \
        [("layer2", "layer2"), ("layer3", "layer3")]
    steps = _staged_run(stages_cache, tmp_path / term, ["ce", term], pairs, [(f"{term}.init_epochs", 1.0)])
    assert [set(t) for t, _, _ in steps] == [{term, "loss"}] * 2 + [{"ce", "loss"}] * 2
    assert torch.equal(steps[0][1], steps[1][1]) and not torch.equal(steps[0][2], steps[1][2])


def test_ab_matches_the_boundary_loss_written_out():
    from softcache.losses.stages import ABLoss
    g = torch.Generator().manual_seed(13)
    student = [torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 2, 2, generator=g)]
    teacher = [torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 2, 2, generator=g)]
    expected = 0.0
    for k, (s, t) in enumerate(zip(map(_np, student), map(_np, teacher))):
        d = ((s + 1) ** 2 * ((s > -1) & (t <= 0)) + (s - 1) ** 2 * ((s <= 1) & (t > 0))).sum()
        expected += 2.0 ** (k - 1) * d / 3 * 3 / 1000
    assert ABLoss([(4, 4), (4, 4)])(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_ft_matches_the_factor_l1_written_out():
    import numpy as np

    from softcache.losses.features import FTLoss
    torch.manual_seed(0)
    ft = FTLoss(3, 4).eval()            # BN of the translator at its running statistics: a fixed map
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        f_s, f_t = _np(ft.translator(s)), _np(ft.encoder(t))

    def factor(f):
        a = (f ** 2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    assert ft(s, t).item() == pytest.approx(np.mean(np.abs(factor(f_s) - factor(f_t))), rel=1e-5)
    rec = _np(ft.decoder(ft.encoder(t)))
    assert ft.init_loss(s, t).item() == pytest.approx(np.mean((rec - _np(t)) ** 2), rel=1e-5)


# --- what the cache stores of the teacher once: BatchNorms for OFD, the classifier for SimKD

def test_the_cache_stores_the_teachers_batchnorms_and_head_once_covered_by_its_integrity(tmp_path, teacher_weights):
    from conftest import load_teacher
    from softcache.data import load_source
    from softcache.dump import dump_teacher
    from softcache.store import open_cache
    from softcache.store.manifest import stored_params
    from softcache.views import Augment
    teacher = load_teacher(teacher_weights)
    common = dict(augment=Augment("cifar", image_size=32), views=2, workers=0, batch_size=32)
    dump_teacher(teacher, load_source("synthetic:20", "train"), tmp_path / "c", layers=["layer3.pre_relu"],
                 teacher_head=True, **common)
    cache = open_cache(tmp_path / "c")
    params = stored_params(cache.manifest)
    bn = teacher.layer3[0].bn2                                   # resnet8: one block a stage; not its shortcut BN
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(torch.from_numpy(params[f"bn/layer3.pre_relu/{key}"]), getattr(bn, key).detach())
    assert torch.equal(torch.from_numpy(params["classifier/weight"]), teacher.fc.weight.detach())
    assert not any(name.startswith("teacher") for name in cache.names())    # not a per-sample array
    dump_teacher(teacher, load_source("synthetic:20", "train"), tmp_path / "plain", layers=["layer3.pre_relu"],
                 **common)
    plain = open_cache(tmp_path / "plain").manifest
    assert plain["id"] != cache.manifest["id"] and "classifier/weight" not in stored_params(plain)
    meta = json.loads((tmp_path / "c" / "zarr.json").read_text())     # a changed parameter is found
    entry = meta["attributes"]["softcache"]["teacher_params"]["classifier/bias"]
    entry["data"] = entry["data"][::-1]
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SoftcacheError, match="its manifest was changed after the dump"):
        open_cache(tmp_path / "c")


def test_ofd_margin_and_partial_l2_match_the_formulas_written_out():
    import numpy as np

    from softcache.losses.stages import OFDLoss, ofd_margin
    gamma, beta = torch.tensor([1.0, 0.5, -2.0, 0.1]), torch.tensor([0.0, 1.0, -1.0, 5.0])
    expected = []
    for g, b in zip(gamma.tolist(), beta.tolist()):
        s = abs(g)
        cdf = 0.5 * math.erfc(b / s / math.sqrt(2))                  # Phi(-b / s)
        pdf = math.exp(-(b / s) ** 2 / 2) / math.sqrt(2 * math.pi)
        expected.append(b - s * pdf / cdf if cdf > 0.001 else -3 * s)
    assert ofd_margin(gamma, beta).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6) and expected[3] == pytest.approx(-0.3)
    g = torch.Generator().manual_seed(14)
    student = [torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 2, 2, 2, generator=g)]
    teacher = [torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 2, 2, generator=g)]
    margins = [ofd_margin(gamma, beta), ofd_margin(gamma, beta)]
    ofd = OFDLoss([(4, 4), (2, 4)], margins).eval()                   # the connectors' BN at running statistics
    total = 0.0
    for k, (s, t) in enumerate(zip(student, teacher)):
        with torch.no_grad():
            s = _np(ofd.connectors[k](s))
        h = s.shape[-1]
        t = _np(t).reshape(3, 4, h, t.shape[-1] // h, h, t.shape[-1] // h).mean((3, 5))
        m = np.array(expected)[None, :, None, None]
        d = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
             + (s - t) ** 2 * (t > 0))
        total += d.mean(0).sum() / 2 ** (1 - k)
    assert ofd(student, teacher).item() == pytest.approx(total, rel=1e-5)


def test_ofd_needs_the_teachers_pre_relu_layers():
    with pytest.raises(SoftcacheError, match=r"ofd needs the teacher's BatchNorm before the ReLU of 'layer3', which "
                                             r"this cache does not hold: pair the teacher's LAYER\.pre_relu layers"):
        DistillLoss({"ofd": 0.001}, routes={"ofd": [("a", "layer2.pre_relu"), ("b", "layer3")]},
                    channels={("a", "layer2.pre_relu"): (4, 4), ("b", "layer3"): (4, 4)},
                    teacher_params={"bn/layer2.pre_relu/weight": torch.ones(4),
                                    "bn/layer2.pre_relu/bias": torch.ones(4)})


def test_simkd_classifies_the_projected_student_map_with_the_teachers_frozen_head():
    from softcache.losses.simkd import PROJECTOR, SimKDStudent
    from softcache.models import Tapped, build_model
    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    keys = set(student.state_dict())
    weight, bias = torch.randn(10, 32), torch.randn(10)
    model = SimKDStudent(student, "layer3", 64, 32, (4, 4), weight, bias).eval()
    assert keys < set(model.state_dict()) and "simkd_head.weight" in model.state_dict()   # the student's names kept
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["simkd_head.weight", "simkd_head.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, f = Tapped(student, ["layer3"])(x)
        pooled = torch.nn.functional.adaptive_avg_pool2d(f["layer3"], 4)        # 8x8 student map, 4x4 teacher's
        expected = (model.simkd_projector(pooled).mean((2, 3)) @ weight.t() + bias)
        logits, feats = Tapped(model, [PROJECTOR])(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert feats[PROJECTOR].shape == (2, 32, 4, 4)


def test_simkd_needs_the_teachers_head_and_one_pair_and_gat_its_maps(tmp_path, small_cache):
    from helpers import invoke
    result = invoke("train-student", "--cache", small_cache, "--student", "resnet8", "--epochs", "1", "--workers", "0",
                    "--batch-size", "8", "--out", tmp_path / "r", "--loss", "ce,gat")
    assert result.exit_code == 1 and "gat needs the teacher's input-gradient maps, which this cache does not hold; " \
        "dump with --layers input_gradient" in result.stderr
    result = invoke("train-student", "--cache", small_cache, "--student", "resnet8", "--epochs", "1", "--workers", "0",
                    "--batch-size", "8", "--out", tmp_path / "r", "--loss", "simkd", "--pair", "layer3=layer3")
    assert result.exit_code == 1 and "simkd reuses the teacher's classifier, which this cache does not store; " \
        "dump with --teacher-head" in result.stderr
    result = invoke("train-student", "--cache", small_cache, "--student", "resnet8", "--epochs", "1", "--workers", "0",
                    "--batch-size", "8", "--out", tmp_path / "r", "--loss", "simkd", "--pair", "layer3=layer3",
                    "--pair", "layer2=layer2")
    assert result.exit_code == 1 and "simkd reads one --pair" in result.stderr
    assert not (tmp_path / "r").exists()


# --- MLKD: a weak and a strong view of every sample, two streams of one cache replayed in lockstep

def test_mlkd_matches_the_reference_codes_sum_written_out():
    import numpy as np

    from softcache.losses.logit import MLKDLoss
    g = torch.Generator().manual_seed(15)
    s_w, t_w, s_s, t_s = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2 for _ in range(4))

    def softmax(z, t):
        e = np.exp(z / t - (z / t).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def kd(a, b, t):
        p, q = softmax(a, t), softmax(b, t)
        return (q * (np.log(q) - np.log(p))).sum(1).mean() * t * t

    def gram(a, b, t, classes):
        pa, pb = softmax(a, t), softmax(b, t)
        ga, gb = (pa.T @ pa, pb.T @ pb) if classes else (pa @ pa.T, pb @ pb.T)
        return ((gb - ga) ** 2).sum() / (a.shape[1] if classes else a.shape[0])

    a, b, c, d = map(_np, (s_w, t_w, s_s, t_s))
    p = softmax(b, 1.0)
    conf, per_class = p.max(1), p.sum(0)
    m = np.mean(conf <= np.percentile(conf, 50))
    m_c = np.mean(per_class <= np.percentile(per_class, 50))
    temps = [4.0, 3.0, 5.0, 2.0, 6.0]
    expected = sum(m * kd(a, b, t) + m_c * gram(a, b, t, True) + m * gram(a, b, t, False) for t in temps)
    expected += sum(kd(c, d, t) for t in temps[:3]) + sum(kd(a, b, t) for t in temps[3:])
    got = MLKDLoss(4.0)(*(x.float() for x in (s_w, t_w, s_s, t_s))).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0.4 <= m <= 0.6 and 0.4 <= m_c <= 0.6          # the masks keep about half


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory, teacher_weights):
    """synthetic:20, 3 views in the main (weak: crops) stream and a strong stream (RandAugment + erasing)."""
    from conftest import load_teacher
    from softcache.data import load_source
    from softcache.dump import dump_teacher, stream_augments
    from softcache.views import Augment
    out = tmp_path_factory.mktemp("strong") / "cache"
    weak = Augment("cifar", image_size=32)
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:20", "train"), out, augment=weak, views=3,
                 seed=2, batch_size=32, workers=0, teacher_info={"arch": "resnet8", "weights_sha256": "test"},
                 streams=stream_augments([("strong", "aa=rand-m9-n2,reprob=0.25")], weak, 3))
    return out


def test_paired_batches_visit_the_same_samples_and_slots_in_both_streams(strong_cache):
    from softcache.batches import PairedBatches, student_data
    from softcache.data import load_source
    from softcache.store import open_cache
    reader, source = open_cache(strong_cache), load_source("synthetic:20", "train")
    common = dict(teacher_layers=[], temperature=4.0, teachers="mean", image_size=32, batch_size=8, seed=5,
                  workers=0, device=torch.device("cpu"))
    weak, _, _ = student_data(reader, source, **common)
    strong, targets, _ = student_data(reader, source, stream="strong", **common)
    paired = PairedBatches(weak, strong, targets)
    for epoch in (0, 1):
        paired.set_epoch(epoch)
        batches = list(paired)
        assert len(batches) == len(paired) == 2
        for batch in batches:
            w, s = batch[:4], batch[-1]
            assert torch.equal(w[2], s[2]) and torch.equal(w[3], s[3]) and torch.equal(w[1], s[1])
            assert not torch.equal(w[0], s[0])                 # other pixels: the strong stream's


def test_mlkd_trains_from_two_streams_and_refuses_one(tmp_path, strong_cache, small_cache):
    from helpers import invoke
    args = ["train-student", "--student", "resnet8", "--epochs", "1", "--workers", "0", "--batch-size", "8",
            "--loss", "mlkd"]
    result = invoke(*args, "--cache", strong_cache, "--out", tmp_path / "m", "--strong-stream", "strong")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_ce", "train_mlkd"} <= set(record) and math.isfinite(record["train_mlkd"])
    result = invoke(*args, "--cache", small_cache, "--out", tmp_path / "one")
    assert result.exit_code == 1 and "mlkd learns from a weak and a strong view of every sample" in result.stderr
    result = invoke(*args, "--cache", small_cache, "--out", tmp_path / "one", "--strong-stream", "strong")
    assert result.exit_code == 1 and "stream 'strong'" in result.stderr
    assert not (tmp_path / "one").exists()


# --- gradient-based attention: the teacher's input-gradient maps cached, the student's by double backprop

def test_the_input_gradient_map_is_the_top_class_score_gradient_written_out():
    import numpy as np

    from softcache.models import INPUT_GRADIENT, Tapped
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():                                    # as the dump runs a teacher
        logits, features = Tapped(model, [INPUT_GRADIENT, "0"])(x)
    assert not features["0"].requires_grad                   # the other taps carry no spent graph
    w = _np(model[1].weight)
    for b in range(2):
        top = int(np.argmax(_np(logits)[b]))
        a = np.abs(w[top].reshape(3, 4, 4)).sum(0).ravel()      # d z_top / d x of a linear model: its row
        assert _np(features[INPUT_GRADIENT][b]).ravel() == pytest.approx(a / np.linalg.norm(a), rel=1e-5)
    assert not logits.requires_grad


def test_gat_matches_its_formula_and_trains_through_the_students_input_gradient():
    import numpy as np

    from softcache.losses.features import GradientATLoss
    from softcache.models import INPUT_GRADIENT, Tapped, build_model, input_gradient_map
    g = torch.Generator().manual_seed(16)
    s, t = torch.rand(3, 4, 4, generator=g), torch.rand(3, 4, 4, generator=g)
    a, b = _np(s).reshape(3, -1), _np(t).reshape(3, -1)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    assert GradientATLoss()(s, t).item() == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)
    torch.manual_seed(0)
    student = Tapped(build_model("resnet8", 10), [])
    x = torch.randn(4, 3, 32, 32)
    x[1] = x[0]                                               # a repeated sample
    x.requires_grad_(True)
    logits, _ = student(x)
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), x, create_graph=True)
    loss = GradientATLoss()(input_gradient_map(grad), torch.rand(4, 32, 32))
    loss.backward()                                           # double backpropagation reaches the weights
    weight = student.model.conv1[0].weight.grad
    assert torch.isfinite(weight).all() and weight.abs().sum() > 0
    assert INPUT_GRADIENT == "input_gradient"


def test_a_learned_temperature_gets_dkds_gradient_through_both_sides(logits):
    s, t, y = logits[0].float(), logits[1].float(), logits[2]
    temperature = torch.tensor(3.0, requires_grad=True)
    DKDLoss()(s, t, y, temperature=temperature).backward()
    h = 1e-3
    with torch.no_grad():
        numeric = (DKDLoss()(s.double(), t.double(), y, temperature=3.0 + h)
                   - DKDLoss()(s.double(), t.double(), y, temperature=3.0 - h)) / (2 * h)
    assert torch.isfinite(temperature.grad) and temperature.grad.item() == pytest.approx(numeric.item(), rel=1e-3)


def test_counting_settings_gat_with_samples_and_a_student_input_gradient_are_refused(tmp_path, stages_cache):
    from helpers import invoke
    from softcache.train import check_full_logits
    for option, least in (("fsp.init_epochs=1.5", 0), ("kdsvd.k=0", 1), ("dkd.warmup=-1", 0)):
        term, key = option.split("=")[0].split(".")
        with pytest.raises(SoftcacheError, match=f"{key} must be a whole number >= {least}"):
            resolve_options({term: 1.0}, [(option.split("=")[0], float(option.split("=")[1]))])
    with pytest.raises(SoftcacheError, match="gat needs the teacher's full logits, and this cache stores sampled"):
        check_full_logits({"ce": 1.0, "gat": 1000.0}, {}, "sampled")
    check_full_logits({"ce": 1.0, "gat": 1000.0}, {}, "topk")               # top-K holds the top class
    result = invoke("train-student", "--cache", stages_cache, "--student", "resnet8", "--epochs", "1", "--workers",
                    "0", "--batch-size", "8", "--out", tmp_path / "g", "--loss", "ce,gat,at", "--pair",
                    "input_gradient=input_gradient")
    assert result.exit_code == 1 and "'input_gradient' is a teacher's cached map, not a student layer" in \
        result.stderr and not (tmp_path / "g").exists()
