"""Build the shipped collection manifest from scDrugMap's catalogue (Supplementary Data 1).

Run ``python -m store.collection_build CATALOGUE.csv [OUT.csv]`` (default output: the package's
``store/data/scdrugmap_collection.csv``). Every column is derived from the catalogue row by the rules
below — nothing is typed by hand, so rebuilding from the same catalogue gives the same file
(``tests/test_collection.py`` checks it):

* ``dataset_id`` = ``<collection>_<series>`` (``primary_Data1``, ``external_Data1``), as the simulator names
  catalogue rows; ``geo_series`` = the ``GSE…`` of ``Original_Dataset``.
* ``accession`` = ``RawData_ID`` (raw reads); its archive gives ``accession_type`` (EGA, SRA BioProject,
  GSA-Human, Dataverse) and ``access``: EGA and GSA-Human are controlled access (a data access committee
  must approve a request), SRA and Dataverse are open.
* ``files``: for open rows GEO's documented series supplementary location
  ``https://ftp.ncbi.nlm.nih.gov/geo/series/GSEnnn/GSExxx/suppl/GSExxx_RAW.tar`` (the per-sample files);
  ``files_confirmed = no`` because the listing could not be read from where this was built — the exact
  names (a series-level matrix instead of or beside ``_RAW.tar``) must be confirmed on the GEO page.
* labels: ``n_sensitive`` / ``n_resistant`` / ``n_other`` and ``timepoints`` from ``Sample_size``
  (``"pre (resistant 2, sensitive 1)"``); ``label_rule`` from ``Description``/``Sample_size`` when they say
  which kind of sample is which class (every pre-treatment sample sensitive and every post-treatment sample
  resistant, or a named marker such as "denoted as EpCAM low"), status ``rule_from_catalogue``; otherwise
  (per-patient clinical response, mixed post-treatment samples) status ``needs_curation``. The
  ``sample_labels`` column (``sample=label|…``) is left empty: no sample is labelled by guess.
* confidence evidence: ``sample_origin`` from ``Source`` (PDX/CDX give 3 stars by the scDrugAtlas rule);
  the catalogue gives no exposure days, so ``exposure_days`` stays empty.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

from scdrugmap.store.errors import InputError

__all__ = ["COLLECTION_COLUMNS", "DEFAULT_COLLECTION", "build_collection", "geo_suppl_url"]

DEFAULT_COLLECTION = Path(__file__).with_name("data") / "scdrugmap_collection.csv"
COLLECTION_COLUMNS = (
    "dataset_id", "collection", "series", "study", "subgroup", "geo_series", "accession", "accession_type",
    "access", "access_note", "files", "files_confirmed", "file_note", "sha256", "size", "label_unit",
    "n_samples", "n_sensitive", "n_resistant", "n_other", "timepoints", "label_rule", "status",
    "curation_note", "sample_labels", "sample_regex", "tissue", "cancer_type", "cancer_subtype", "drug_class",
    "regimen", "source", "sample_origin", "exposure_days", "technology", "processing", "organism", "pmid",
    "date", "description",
)  # fmt: skip
_REQUIRED = ("Collections", "scDrugMap_collection_series_number", "Original_Dataset", "RawData_ID",
             "Sample_size", "Sample_size_all", "Description")  # fmt: skip


def geo_suppl_url(gse: str, name: str = "") -> str:
    """GEO's documented series supplementary URL: ``…/geo/series/GSE161nnn/GSE161801/suppl/<name>``."""
    stem = gse[:-3] + "nnn" if len(gse) > 6 else "GSEnnn"
    return f"https://ftp.ncbi.nlm.nih.gov/geo/series/{stem}/{gse}/suppl/{name}"


def _archive(accession: str) -> tuple[str, str, str]:
    """``(accession_type, access, how to get it)`` of a raw-data accession."""
    acc = accession.strip()
    if acc.startswith("EGA"):
        return ("EGA", "controlled", f"controlled access at the European Genome-phenome Archive: request access to "
                f"{acc} from its Data Access Committee at https://ega-archive.org/datasets/{acc} (an EGA account "
                "and a signed data access agreement are needed)")  # fmt: skip
    hra = re.search(r"HRA\d+", acc)
    if hra:
        return ("GSA-Human", "controlled", f"controlled access at the NGDC Genome Sequence Archive for Human: "
                f"submit a data access request for {hra.group()} at https://ngdc.cncb.ac.cn/gsa-human/browse/"
                f"{hra.group()} (approval by the data owner)")  # fmt: skip
    if acc.startswith("PRJ"):
        return (
            "SRA",
            "open",
            f"raw reads open at SRA BioProject https://www.ncbi.nlm.nih.gov/bioproject/{acc}",
        )
    if "dataverse" in acc.lower() or "10.7910" in acc:
        return "Dataverse", "open", f"open at Harvard Dataverse {acc}"
    return "other", "open", f"see {acc}"


def _counts(text: str) -> dict[str, int]:
    low = text.lower()
    out = {k: sum(map(int, re.findall(rf"\b{k}\w*\s+(\d+)", low))) for k in ("sensitive", "resistant")}
    other = re.findall(r"\b(persist\w*)\s+(\d+)", low)
    out["other"] = sum(int(n) for _, n in other)
    return out


def _timepoints(text: str, description: str) -> str:
    low = f"{text} {description}".lower()
    pre, post = bool(re.search(r"\bpre\b|pre-", low)), bool(re.search(r"\bpost\b|post-", low))
    return "pre+post" if pre and post else "pre" if pre else "post" if post else "unspecified"


def _label_rule(sample_size: str, description: str) -> tuple[str, str]:
    """``(rule, status)`` from the catalogue's words; never a guess."""
    low = description.lower()
    denoted = [
        (k.lower(), v)
        for k, v in re.findall(r"(resistant|sensitive)[^()]*\(denoted as ([^)]+)\)", description, re.I)
    ]
    if {k for k, _ in denoted} == {"resistant", "sensitive"}:
        rule = "; ".join(f"samples denoted {v.strip()} → {k}" for k, v in denoted)
        return rule, "rule_from_catalogue"
    ss = sample_size.lower().replace(" ", "")
    sens_pre = "sensitivepre-treatment" in low.replace(" ", "") or re.search(r"pre\(sensitive\d+\)", ss)
    res_post = "resistantpost-treatment" in low.replace(" ", "") or re.search(r"post\(resistant\d+\)", ss)
    mixed = re.search(r"sensitive post|resistant pre|post-treatment sensitive|pre-treatment resistant", low)
    if sens_pre and res_post and not mixed:
        return "pre-treatment samples → sensitive; post-treatment samples → resistant", "rule_from_catalogue"
    return "", "needs_curation"


def _row(r: dict[str, str], coll: str) -> dict[str, str]:
    series = r["scDrugMap_collection_series_number"].strip()
    gse = re.search(r"GSE\d+", r["Original_Dataset"]) or re.search(r"GSE\d+", r["Dataset_subgroup"])
    gse = gse.group() if gse else ""
    acc_type, access, how = _archive(r["RawData_ID"])
    counts = _counts(r["Sample_size"])
    rule, status = _label_rule(r["Sample_size"], r["Description"])
    geo_page = f"https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc={gse}"
    if access == "open":
        files = geo_suppl_url(gse, f"{gse}_RAW.tar")
        file_note = (f"GEO's series supplementary path; confirm the exact file names at {geo_page} (a series-level "
                     f"count matrix may replace or accompany _RAW.tar), then record them with size/sha256 here")  # fmt: skip
        access_note = how
    else:
        files, file_note = "", f"processed matrices, if GEO holds any, are listed at {geo_page}"
        access_note = (f"{how}; once approved, put the files into the dataset's cache folder and run "
                       f"`scdrugmap collection prepare`")  # fmt: skip
    what = f"{counts['sensitive']} sensitive / {counts['resistant']} resistant sample(s)"
    if counts["other"]:
        what += f", {counts['other']} other (e.g. persister) to exclude or curate"
    if status == "needs_curation":
        note = (f"the catalogue gives {what} ({r['Sample_size'].strip()}) but not which sample or patient is "
                f"which; map GEO sample ids to labels from {geo_page} and PMID {_pmid(r['PMID'])}")  # fmt: skip
    else:
        note = f"apply the rule to the GEO sample titles at {geo_page} ({what}) and fill sample_labels"
    src = r["Source"].strip()
    origin = "pdx" if re.search(r"\bpdx\b", src.lower()) else "cdx" if "cdx" in src.lower() else src.lower()
    return {
        "dataset_id": f"{coll}_{series}", "collection": coll, "series": series,
        "study": r["Original_Dataset"].strip(), "subgroup": r["Dataset_subgroup"].strip(), "geo_series": gse,
        "accession": r["RawData_ID"].strip(), "accession_type": acc_type, "access": access,
        "access_note": access_note, "files": files, "files_confirmed": "no", "file_note": file_note,
        "sha256": "", "size": "", "label_unit": "sample",
        "n_samples": r["Sample_size_all"].strip(), "n_sensitive": str(counts["sensitive"]),
        "n_resistant": str(counts["resistant"]), "n_other": str(counts["other"]),
        "timepoints": _timepoints(r["Sample_size"], r["Description"]), "label_rule": rule, "status": status,
        "curation_note": note, "sample_labels": "", "sample_regex": "",
        "tissue": r["Tissue"].strip(), "cancer_type": r["Cancer_type_level1"].strip(),
        "cancer_subtype": r["Cancer_type_level2"].strip(), "drug_class": r["Drug_type"].strip().lower(),
        "regimen": r["Regimen"].strip(), "source": src, "sample_origin": origin, "exposure_days": "",
        "technology": r["Extract_protocol"].strip(), "processing": r["Data_processing"].strip(),
        "organism": r["Organism"].strip(), "pmid": _pmid(r["PMID"]), "date": r["Date"].strip(),
        "description": r["Description"].strip(),
    }  # fmt: skip


def _pmid(text: str) -> str:
    text = text.strip()
    return str(int(float(text))) if re.fullmatch(r"\d+(\.\d*)?", text) else text


def build_collection(catalogue: str | Path) -> pd.DataFrame:
    """The collection manifest (columns :data:`COLLECTION_COLUMNS`) of a scDrugMap catalogue CSV.

    Raises
    ------
    InputError
        A missing file or column, or two rows with the same collection and series number.
    """
    catalogue = Path(catalogue)
    if not catalogue.is_file():
        msg = f"catalogue not found: {catalogue}"
        raise InputError(msg)
    cat = pd.read_csv(catalogue, dtype=str, keep_default_na=False)
    missing = [c for c in _REQUIRED if c not in cat.columns]
    if missing:
        msg = f"{catalogue.name} lacks the catalogue column(s) {missing}"
        raise InputError(msg)
    rows = []
    for r in cat.to_dict("records"):
        name = r["Collections"].strip().lower().removesuffix(" collection")
        rows.append(_row({k: r.get(k, "") for k in cat.columns}, "primary" if name == "main" else name))
    df = pd.DataFrame(rows, columns=list(COLLECTION_COLUMNS))
    dup = df["dataset_id"][df["dataset_id"].duplicated()].tolist()
    if dup:
        msg = f"{catalogue.name}: duplicated collection/series {dup}"
        raise InputError(msg)
    return df


def main(argv: list[str] | None = None) -> None:
    """``python -m store.collection_build CATALOGUE.csv [OUT.csv]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        raise SystemExit(2)
    out = Path(args[1]) if len(args) == 2 else DEFAULT_COLLECTION
    out.parent.mkdir(parents=True, exist_ok=True)
    df = build_collection(args[0])
    tmp = out.with_name(f".{out.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
    print(f"wrote {out}: {len(df)} datasets, {int((df['access'] == 'controlled').sum())} controlled access, "
          f"{int((df['status'] == 'needs_curation').sum())} need label curation")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
