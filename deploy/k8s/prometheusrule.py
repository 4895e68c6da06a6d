"""Write base/prometheusrule.yaml from deploy/prometheus/alerts.yml, the one copy of the alert rules.

    python deploy/k8s/prometheusrule.py          # after editing alerts.yml

The rules file goes under `spec:` unchanged, comments included (indented, not re-serialised), so that the two
read alike; tests/unit/test_deploy.py checks that the rendered PrometheusRule's groups equal alerts.yml's.
Standard library only.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/prometheusrule.py: edit alerts.yml, then run
#   python deploy/k8s/prometheusrule.py
# (a test fails while the two differ).
#
# kube-prometheus-stack loads PrometheusRules labelled `release: <its Helm release name>` (the chart's
# ruleSelectorNilUsesHelmValues): change the label if the release is not called kube-prometheus-stack.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imagegen
  labels:
    app.kubernetes.io/name: imagegen
    release: kube-prometheus-stack
spec:
"""


def render(alerts: str) -> str:
    body = "".join(f"  {line}" if line.strip() else line for line in alerts.splitlines(keepends=True))
    return HEADER + body


def main() -> None:
    TARGET.write_text(render(ALERTS.read_text()))
    print(f"wrote {TARGET.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
