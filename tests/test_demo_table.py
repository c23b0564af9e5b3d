"""`make demo`'s final table fits an 80-column terminal (one line per row, no wrapping)."""

from __future__ import annotations

from rich.console import Console


def test_demo_table_fits_80_columns(monkeypatch):
    from deltazip import ui
    from deltazip.commands.demo import DEMO_COLUMNS

    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(ui, "console", console)
    rows = [("base", "reverse djbvk=", "'4wdq'", "no", "-", "-", "19/23")]
    for task, prompt, answer in (("reverse", "reverse djbvk=", "kvbjd"), ("caesar", "caesar eov=", "hry"),
                                 ("upper", "upper buwhy=", "BUWHY"), ("add", "add 59+2=", "61")):
        rows.append((task, prompt, repr(answer), "yes", "9.4x", "12.5", "1234/1234"))
    ui.print_table("deltazip demo: one tritonserver, the base and every fine-tune", DEMO_COLUMNS, rows)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) == len(rows) + 5  # title, top rule, header, header rule, rows, bottom rule: no wraps
