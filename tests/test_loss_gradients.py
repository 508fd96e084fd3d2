"""The per-term gradient diagnostic runs and reports every ELCRec term."""

from pathlib import Path

from adarec.profiling.loss_gradients import main

REPO = Path(__file__).resolve().parents[1]


def test_reports_each_term_and_group(capsys):
    code = main(["--config", str(REPO / "configs/elcrec_beauty.yaml"), "--set", "data.max_users=200",
                 "model.hidden_size=16", "model.num_intent_clusters=4", "train.batch_size=32"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:2] == ["term", "value"] and "transformer_blocks" in out[0]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out[1:]}
    assert set(rows) == {"rec", "cluster", "instance_cl", "intent_cl"}
    assert all(len(v) == 4 and all(x == x for x in v) for v in rows.values())  # value + 3 finite norms
    assert rows["rec"][1] > 0  # the rec loss reaches the item embeddings
