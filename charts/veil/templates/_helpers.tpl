{{/*
Names are fixed, not derived from the release name: the chart is installed once per
cluster (its ValidatingAdmissionPolicy and ClusterRoles are cluster-wide), the agents
find the issuer at the Service name veil-issuer, and the issuer's serving certificate
names ServiceAccount veil-issuer, which is the agents' default issuer ID.
*/}}
{{- define "veil.agentName" -}}veil-agent{{- end }}
{{- define "veil.issuerName" -}}veil-issuer{{- end }}
{{- define "veil.issuerServiceAccount" -}}veil-issuer{{- end }}
{{- define "veil.issuerPort" -}}8443{{- end }}
{{/* The audience of the agents' projected tokens; the issuer accepts no other. */}}
{{- define "veil.issuerAudience" -}}veil-issuer{{- end }}
{{- define "veil.trustBundleConfigMap" -}}veil-trust-bundle{{- end }}
{{- define "veil.caSecret" -}}veil-issuer-ca{{- end }}
{{- define "veil.caLease" -}}veil-issuer-ca{{- end }}
{{/* The host directory pods mount to reach the SPIFFE Workload API (and nothing else). */}}
{{- define "veil.workloadApiDir" -}}/run/veil/workload-api{{- end }}
{{- define "veil.cniSocket" -}}/run/veil/cni.sock{{- end }}
{{- define "veil.adminSocket" -}}/run/veil/admin.sock{{- end }}

{{- define "veil.labels" -}}
app.kubernetes.io/name: veil
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels never change across upgrades (a DaemonSet's selector is immutable). */}}
{{- define "veil.agentSelector" -}}
app.kubernetes.io/name: veil
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "veil.issuerSelector" -}}
app.kubernetes.io/name: veil
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: issuer
{{- end }}

{{- define "veil.image" -}}
{{ .repository }}:{{ .tag }}
{{- end }}
