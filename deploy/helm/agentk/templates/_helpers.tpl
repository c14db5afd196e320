{{/* The chart's name, overridable. */}}
{{- define "agentk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the release's objects: the release name alone when it already says agentk. */}}
{{- define "agentk.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "agentk.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRoles, ClusterRoleBindings) carry the namespace too, so two
releases of the same name in different namespaces do not overwrite each other's.
*/}}
{{- define "agentk.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "agentk.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agentk.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "agentk.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "agentk.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentk.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the token: an existing one, or the chart's own. */}}
{{- define "agentk.tokenSecretName" -}}
{{- if .Values.config.secretName }}
{{- .Values.config.secretName }}
{{- else if .Values.config.token }}
{{- printf "%s-token" (include "agentk.fullname" .) }}
{{- else }}
{{- fail "set config.secretName (an existing Secret with the key `token`) or config.token" }}
{{- end }}
{{- end }}

{{- define "agentk.observabilityAddress" -}}
{{- $a := .Values.config.observability.bindAddress }}
{{- if contains ":" $a }}[{{ $a }}]{{ else }}{{ $a }}{{ end }}:{{ .Values.config.observability.port }}
{{- end }}

{{- define "agentk.subject" -}}
- kind: ServiceAccount
  name: {{ include "agentk.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/*
Refuses to render without this chart's own values (see valuesVersion in values.yaml). Included
first in every template, so that it is the error helm reports rather than a template failing on
a key the release's values lack.
*/}}
{{- define "agentk.valuesInForce" -}}
{{- if ne (toString .Values.valuesVersion) "1" -}}
{{- fail (printf "the values of this chart version are missing (valuesVersion %s, expected 1): helm upgrade --reuse-values keeps the values of the chart version the release was installed with, without the keys added since. Upgrade with --reset-then-reuse-values (Helm 3.14+), or with -f and your values file (docs/UPGRADING.md)" (.Values.valuesVersion | default "none" | toString)) -}}
{{- end -}}
{{- end -}}
