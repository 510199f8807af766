"""The progress line: under a terminal's tqdm bar the interval lines still reach train.log (not the terminal), and
every line says how much of the time went to waiting for data."""
import logging
import sys
import time

from xception_mx.console import log_to_file, setup_logging
from xception_mx.metrics import Accumulator
from xception_mx.progress import Progress


def _acc():
    acc = Accumulator()
    acc.loss_sum, acc.count = 2.0, 4
    return acc


def test_under_a_bar_the_interval_line_goes_to_train_log_only(tmp_path, monkeypatch, capsys):
    package = logging.getLogger("xception_mx")  # restored afterwards: later tests read the log through caplog
    monkeypatch.setattr(package, "handlers", list(package.handlers))
    monkeypatch.setattr(package, "propagate", package.propagate)
    setup_logging()
    log_to_file(str(tmp_path / "train.log"))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = Progress(epoch=3, total=4, batch_size=2, interval=2)
    assert progress.bar is not None
    progress.update(0.1)
    progress.update(0.1, _acc())
    progress.close()
    for handler in package.handlers:
        handler.flush()
        if isinstance(handler, logging.FileHandler):
            handler.close()
    assert "epoch 3 [2/4] loss" in (tmp_path / "train.log").read_text()
    assert "epoch 3 [2/4] loss" not in capsys.readouterr().out  # the terminal has the bar


def test_the_line_gives_the_share_of_time_spent_waiting_for_data(caplog):
    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    progress = Progress(epoch=1, total=3, batch_size=1, interval=3)
    progress.bar = None
    with caplog.at_level(logging.INFO, logger="xception_mx.train"):
        for _ in progress.timed(slow_batches()):
            pass
        progress.update(0.1, _acc())
    assert progress.data_wait >= 0.15
    share = int(caplog.records[-1].getMessage().split(" data ")[1].split("%")[0])
    assert share >= 90, caplog.records[-1].getMessage()  # all the time went to waiting here
