"""What a site adaptation's record says to people: the verdict in one sentence, the recipes'
cross-validated figures, the parent-vs-adapted figures per label (with the labels not checked),
as table rows for the Adapt page and as the markdown the command line prints."""

from __future__ import annotations


def _f(v, ci=None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    s = f"{v:+.3f}" if signed else f"{v:.3f}"
    if ci:
        s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def words(label: str) -> str:
    """A local label as people write it ("no_tumor" -> "no tumour")."""
    return {"no_tumor": "no tumour", "tumor": "tumour (type not given)"}.get(label, label.replace("_", " "))


def verdict_sentence(record: dict) -> str:
    chk = record["check"]
    scored = f"{chk['scored_cases']} confirmed cases, each predicted by a model adapted without it ({chk['method']})"
    if record["verdict"] == "no gain shown":
        return ("No gain shown: no recipe did measurably better than the parent on " + scored
                + "; nothing was adapted and the parent stays in place.")
    g = chosen(record)["gain"]
    head = (f"Recipe **{record['chosen']}** chosen: accuracy {_f(g['accuracy_parent'])} -> {_f(g['accuracy'])}, "
            f"gain {_f(g['gain'], g['gain_ci95'], signed=True)} on {scored}.")
    if record["verdict"] == "accepted":
        return head + " Accepted: it may become the site default."
    return head + " Rejected: " + "; ".join(record["reasons"]) + ". It cannot become the site default."


def chosen(record: dict) -> dict:
    return next(r for r in record["recipes"] if r["name"] == record["chosen"])


def recipes_table(record: dict) -> list[dict]:
    """One row per recipe: what it does, its out-of-fold accuracy and gain over the parent with
    the 95% interval, its fold models' reference accuracy drop, and why it was not chosen."""
    rows = []
    for r in record["recipes"]:
        g, ref = r.get("gain"), r.get("reference_cv")
        if r["name"] == record.get("chosen"):
            status = "chosen"
        elif r["status"] == "skipped":
            status = "not run: " + "; ".join(r["reasons"])
        elif r["eligible"]:
            status = "gain shown, smaller"
        else:
            status = "; ".join(r["reasons"])
        rows.append({"recipe": r["name"], "what it does": r["description"],
                     "accuracy (held-out folds)": None if g is None else round(g["accuracy"], 3),
                     "gain over parent [95% CI]": "" if g is None else _f(g["gain"], g["gain_ci95"], signed=True),
                     "reference drop": None if not ref else round(ref["drop"], 3),
                     "minutes": None if r.get("duration_s") is None else round(r["duration_s"] / 60, 1),
                     "verdict": status})
    return rows


def figures_table(record: dict) -> list[dict]:
    """Parent vs adapted on the held-out folds (accuracy, recall per checked label, tumour vs
    none), with 95% intervals, then one row per label not checked."""
    before, after = record["before"], record.get("after") or {}
    rows = []
    for key in [k for k in before if not k.endswith("_ci95") and k not in ("n", "n_by_label")]:
        name = key.replace("_", " ")
        if key.startswith("recall_"):
            lab = key[len("recall_"):]
            name = f"recall: {words(lab)} ({before['n_by_label'][lab]} cases)"
        rows.append({"figure": name, "parent": _f(before[key], before.get(key + "_ci95")),
                     "adapted": _f(after.get(key), after.get(key + "_ci95")) if after else "not adapted"})
    chk = record["check"]
    for lab, n in chk["not_checked"].items():
        rows.append({"figure": f"recall: {words(lab)} ({n} cases)", "parent": "not checked",
                     "adapted": f"not checked: adapted on, fewer than the {chk['folds']} patients a check needs"})
    for c in chk["classes_without_cases"]:
        rows.append({"figure": f"recall: {words(c)}", "parent": "not checked", "adapted": "not checked: no local case"})
    return rows


def report_markdown(record: dict) -> str:
    p, c = record["parent"], record["cases"]
    lines = [f"# Site adaptation of {p['name']} {p['version']}", "",
             f"Confirmed cases: {c['n']} (" + ", ".join(f"{words(k)} {v}" for k, v in c["by_label"].items())
             + f"; grouped by {c['grouped_by']}); unlabelled scans: {c['unlabelled_scans']}.", "",
             verdict_sentence(record).replace("**", ""), "", "## Recipes (held-out folds)", ""]
    rows = recipes_table(record)
    keys = list(rows[0]) if rows else []
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    lines += ["", "## Parent vs adapted, per label (held-out folds, 95% CI)", "",
              "| figure | parent | adapted |", "|---|---|---|"]
    lines += [f"| {r['figure']} | {r['parent']} | {r['adapted']} |" for r in figures_table(record)]
    ref = record.get("reference")
    if ref:
        after = ref.get("accuracy_after")
        lines += ["", f"Reference test split ({', '.join(ref['folders'][:1])}, {ref['test_cases']} cases, "
                      f"{ref['excluded_local_cases']} local cases left out): accuracy {_f(ref['accuracy_before'])}"
                      + (f" -> {_f(after)}" if after is not None else "") + f" (largest allowed drop {ref['margin']})."]
    lines += ["", f"Rule: {record['check']['rule']}.",
              "Verdict: " + record["verdict"] + ("" if record["accepted"] else ": " + "; ".join(record["reasons"]))]
    return "\n".join(lines) + "\n"
