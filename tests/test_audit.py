"""The privacy audit really attacks: DLG rebuilds a digit from an unprotected
single-sample gradient, iDLG reads the label off the last layer, and with the top
10% most sensitive parameters encrypted an attacker that must guess them gets an
image no better than noise."""

from fedmq.tools.audit import runner


def test_dlg_succeeds_unprotected_and_fails_when_sensitive_parameters_are_encrypted(tmp_path):
    r = runner.run(seeds=1, iterations=60, progress=False, only=["none", "ckks-sens-p0.1"])
    noise = r["random_image_psnr"]
    s = r["summary"]
    assert s["none"]["dlg"]["psnr_mean"] > noise + 12  # recognizable
    assert s["none"]["dlg"]["ssim_mean"] > 0.8
    assert s["ckks-sens-p0.1 (zero-guess)"]["dlg"]["psnr_mean"] < noise + 4  # at the level of noise
    idlg = [row for row in r["rows"] if row["attack"] == "idlg" and row["mode"] == "none"]
    assert all(row["label_correct"] for row in idlg)
    runner.plot(r, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 10_000
