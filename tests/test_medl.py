"""nnSSL_MEDLTrainer in-process and through the real console scripts (tiny synthetic dataset, CPU plans)."""

import os

import numpy as np
import pytest
import torch

from conftest import DATASET, DATASET_ID, run, script
from nnssl.losses.evidential import expected_log_probs
from nnssl.trainers import medl as medl_module
from nnssl.networks.pair import NetworkPair
from nnssl.trainers.medl import nnSSL_MEDLTrainer
from trainer_helpers import batches, grads, make_trainer, started, started_2d


def test_pair_averages_probabilities_and_heads_match(workspace):
    t = make_trainer(nnSSL_MEDLTrainer)
    t.initialize()
    pair = t.network
    assert isinstance(pair, NetworkPair) and type(pair.net_b).__name__ == "ResidualEncoderUNet"
    x = torch.randn(1, 1, 32, 32, 32)
    pair.eval()
    with torch.no_grad():  # two separate forward passes: compare up to float round-off of CPU kernels
        out = pair(x)
        with pair.both_outputs():
            out_a, out_b = pair(x)
    assert [o.shape for o in out_a] == [o.shape for o in out_b]  # same deep-supervision shapes
    mean = 0.5 * (expected_log_probs(out_a[0]).exp() + expected_log_probs(out_b[0]).exp())
    assert torch.allclose(torch.softmax(out[0], 1), mean, atol=1e-5)


def test_unlabeled_terms_reach_both_networks_and_total_is_their_sum(workspace):
    t = started(make_trainer(nnSSL_MEDLTrainer))
    t.global_step = t.num_epochs * t.num_iterations_per_epoch  # warm-up at its maximum
    _, data_l, target_l, data_u = batches(t)
    total, terms = t.compute_loss(data_l, target_l, data_u)
    expected = (terms["sup_loss"] + terms["curriculum_loss"] + terms["unsup_weight"] * terms["pseudo_label_loss"]
                + terms["unsup_weight"] * terms["fisher_loss"])
    assert torch.isclose(total, expected)
    for net in (t.network.net_a, t.network.net_b):
        params = list(net.parameters())
        for term in ("pseudo_label_loss", "fisher_loss"):  # fails if a term is dropped or detached
            assert grads(terms[term], params).abs().sum() > 0, term
        g_total = grads(total, params)
        g_without_fisher = grads(total - terms["unsup_weight"] * terms["fisher_loss"], params)
        assert not torch.allclose(g_total, g_without_fisher)
    t.on_train_end()


def test_pseudo_label_term_has_the_papers_weight_from_the_first_step_and_options_change_the_loss(workspace):
    """MEDL (Eq. 9) warms up only the Fisher term: at step 0 the fused pseudo-label Dice + CE has full weight."""
    t = started(make_trainer(nnSSL_MEDLTrainer))
    t.global_step = 0
    _, data_l, target_l, data_u = batches(t)
    total, terms = t.compute_loss(data_l, target_l, data_u)
    assert terms["pseudo_label_weight"] == 1.0 and terms["unsup_weight"] == pytest.approx(np.exp(-5))
    expected = (terms["sup_loss"] + terms["curriculum_loss"] + 1.0 * terms["pseudo_label_loss"]
                + terms["unsup_weight"] * terms["fisher_loss"])
    assert torch.isclose(total, expected)
    t.warmup_pseudo_label_loss = True  # the earlier default: the whole-run ramp on the pseudo-label term too
    total_w, terms_w = t.compute_loss(data_l, target_l, data_u)
    assert terms_w["pseudo_label_weight"] == pytest.approx(np.exp(-5))
    assert torch.isclose(total - total_w, (1 - np.exp(-5)) * terms["pseudo_label_loss"], rtol=1e-4)
    t.warmup_pseudo_label_loss = False
    t.reliability_mode, t.reliability_threshold = "mask", 0.99  # hard mask instead of the reliability weight
    _, masked = t.compute_loss(data_l, target_l, data_u)
    assert not torch.isclose(masked["pseudo_label_loss"], terms["pseudo_label_loss"])
    t.reliability_mode = "weight"
    t.global_step = t.num_epochs * t.num_iterations_per_epoch  # curriculum at its end: uncertainty matters most
    _, own_half = t.compute_loss(data_l, target_l, data_u)
    t.uncertainty_mix_own = 1.0  # a network's own uncertainty only, not the fused one
    _, own_only = t.compute_loss(data_l, target_l, data_u)
    assert not torch.isclose(own_only["curriculum_loss"], own_half["curriculum_loss"])
    t.on_train_end()


def test_pseudo_labels_come_from_the_fusion(workspace, monkeypatch):
    """Fails if the networks stop learning from the fused opinion (e.g. each from its own argmax)."""
    t = started(make_trainer(nnSSL_MEDLTrainer))
    t.global_step = t.num_epochs * t.num_iterations_per_epoch
    _, data_l, target_l, data_u = batches(t)
    torch.manual_seed(0)
    _, fused_terms = t.compute_loss(data_l, target_l, data_u)
    monkeypatch.setattr(medl_module, "caef_fusion", lambda b1, u1, b2, u2: (b1, u1))  # no fusion: net A alone
    _, own_terms = t.compute_loss(data_l, target_l, data_u)
    assert not torch.isclose(fused_terms["pseudo_label_loss"], own_terms["pseudo_label_loss"])
    assert not torch.isclose(fused_terms["fisher_loss"], own_terms["fisher_loss"])
    t.on_train_end()


def test_train_step_checkpoint_round_trip(workspace, tmp_path):
    t = started(make_trainer(nnSSL_MEDLTrainer))
    b_before = [p.detach().clone() for p in t.network.net_b.parameters()]
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["fisher_loss"] != 0 and out["pseudo_label_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(t.network.net_b.parameters(), b_before))  # 2nd optimizer
    t.current_epoch = 1
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    t.on_train_end()
    r = make_trainer(nnSSL_MEDLTrainer)
    r.load_checkpoint(path)
    assert r.global_step == 1
    for k, v in t.network.state_dict().items():
        assert torch.equal(r.network.state_dict()[k], v), k
    assert r.ssl_optimizers["net_b"].state_dict()["state"].keys() == t.ssl_optimizers["net_b"].state_dict()[
        "state"].keys()
    assert len(r.ssl_optimizers["net_b"].state_dict()["state"]) > 0


def test_2d_configuration(workspace, capsys):
    t = started_2d(nnSSL_MEDLTrainer)
    out = t.train_step(next(t.dataloader_train))
    assert np.isfinite(out["loss"]) and out["pseudo_label_loss"] > 0
    t.on_train_end()
    # benchmarks/pair_per_class.py reads a 2d pair's checkpoint too (a volume's slices as one batch)
    import importlib.util

    spec = importlib.util.spec_from_file_location("pair_per_class", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "pair_per_class.py"))
    pair_per_class = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pair_per_class)
    capsys.readouterr()
    pair_per_class.main([t.output_folder, "--preprocessed", t.preprocessed_dataset_folder_base, "--cases", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines[1:]] == ["net_a", "net_b", "pair"], lines


@pytest.mark.slow
def test_cli_train_and_predict_average_differs_from_each_network(workspace, tmp_path):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    variant = "nnSSL_MEDLTrainer_2epochs_3iters_1valiters"
    env = dict(os.environ)
    run([script("nnssl_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", variant, "-p", "nnUNetPlans_cpu",
         "-device", "cpu"], env)
    images = os.path.join(workspace, "raw", DATASET, "imagesTs")
    preds = str(tmp_path / "pair")
    run([script("nnssl_predict"), "-i", images, "-o", preds, "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0",
         "-tr", variant, "-p", "nnUNetPlans_cpu", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
         "--save_probabilities"], env)
    model = os.path.join(workspace, "res", DATASET, f"{variant}__nnUNetPlans_cpu__3d_fullres")
    pair_probs = np.load(os.path.join(preds, "synthtest_000.npz"))["probabilities"]

    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    for name in ("net_a", "net_b"):  # each network validated beside the pair every epoch
        assert len(ckpt["logging"][f"val_dice_{name}"]) == 2
    plans = PlansManager(load_json(os.path.join(model, "plans.json")))
    cm = plans.get_configuration("3d_fullres")
    pair = nnSSL_MEDLTrainer.build_network_architecture(plans, cm, 1, 3, False)
    pair.load_state_dict(ckpt["network_weights"])
    data = torch.from_numpy(_preprocessed(plans, cm, model, images))
    probs = {}
    for name, net in (("pair", pair), ("net_a", pair.net_a), ("net_b", pair.net_b)):
        predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"),
                                    perform_everything_on_device=False)
        predictor.manual_initialization(net, plans, cm, [net.state_dict()],
                                        load_json(os.path.join(model, "dataset.json")), variant, None)
        logits = predictor.predict_logits_from_preprocessed_data(data).float()
        # the pair's outputs are log-probabilities already; a single network's are evidential logits
        probs[name] = (torch.softmax(logits, 0) if name == "pair" else expected_log_probs(logits[None])[0].exp()
                       ).numpy()
    assert np.allclose(probs["pair"], pair_probs, atol=5e-3)  # the console script predicted with the average
    # (that the pair's output is the mean of the two networks' probabilities is tested on the network itself in
    # test_pair_averages_probabilities_and_heads_match: nnU-Net's sliding window accumulates in float16, which
    # blurs that identity where its Gaussian weights underflow)
    for name in ("net_a", "net_b"):
        assert np.abs(probs[name] - pair_probs).max() > 0.02, name


def _preprocessed(plans, cm, model, images):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, _, _ = DefaultPreprocessor(verbose=False).run_case(
        [os.path.join(images, "synthtest_000_0000.nii.gz")], None, plans, cm,
        load_json(os.path.join(model, "dataset.json")))
    return data
