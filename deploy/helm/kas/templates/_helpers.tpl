{{- define "kas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the release's objects: the release name alone when it already says kas. */}}
{{- define "kas.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "kas.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kas.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kas.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
kas.yaml: what the chart's values decide, with `config` merged over it. Paths point at the
mounts of the StatefulSet (data on the volume, TLS and the admin token from Secrets).
*/}}
{{- define "kas.configuration" -}}
{{- $v := .Values }}
{{- $tls := dict }}
{{- if $v.tls.secretName }}
{{- $tls = dict "certificate_file" "/etc/kas/tls/tls.crt" "key_file" "/etc/kas/tls/tls.key" }}
{{- end }}
{{- $cfg := dict "data_dir" "/var/lib/kas" }}
{{- $_ := set $cfg "agent" (dict "listen" (merge (dict "address" (printf "0.0.0.0:%v" $v.agent.port)) $tls)) }}
{{- $api := dict "listen" (dict "address" (printf "127.0.0.1:%v" $v.api.port)) }}
{{- if $v.api.expose }}
{{- $_ := set $api "listen" (merge (dict "address" (printf "0.0.0.0:%v" $v.api.port)) $tls) }}
{{- end }}
{{- if $v.adminToken.secretName }}
{{- $_ := set $api "admin_token_file" "/etc/kas/admin/admin-token" }}
{{- end }}
{{- $k8s := dict "path_prefix" $v.kubernetesApi.pathPrefix }}
{{- if $v.kubernetesApi.enabled }}
{{- $_ := set $k8s "listen" (merge (dict "address" (printf "0.0.0.0:%v" $v.kubernetesApi.port)) $tls) }}
{{- else }}
{{- $_ := set $k8s "listen" (dict "address" (printf "127.0.0.1:%v" $v.kubernetesApi.port)) }}
{{- end }}
{{- with $v.kubernetesApi.publicUrl }}
{{- $_ := set $k8s "public_url" . }}
{{- end }}
{{- with $v.tls.caKey }}
{{- $_ := set $api "ca_file" (printf "/etc/kas/tls/%s" .) }}
{{- $_ := set $k8s "ca_file" (printf "/etc/kas/tls/%s" .) }}
{{- end }}
{{- $_ = set $cfg "api" $api }}
{{- $_ = set $cfg "kubernetes_api" $k8s }}
{{- if $v.webhooks.enabled }}
{{- $_ = set $cfg "webhooks" (dict "listen" (merge (dict "address" (printf "0.0.0.0:%v" $v.webhooks.port)) $tls)) }}
{{- end }}
{{- $_ = set $cfg "observability" (dict "listen" (dict "address" (printf "0.0.0.0:%v" $v.observability.port)) "logging" (dict "level" $v.observability.logLevel)) }}
{{- if $v.database.urlSecret.name }}
{{- $_ = set $cfg "database" (dict "url_file" "/etc/kas/database/url") }}
{{- end }}
{{- if $v.redis.url }}
{{- $redis := dict "url" $v.redis.url }}
{{- if $v.redis.passwordSecret.name }}
{{- $_ = set $redis "password_file" "/etc/kas/redis/password" }}
{{- end }}
{{- if $v.redis.caSecret.name }}
{{- $_ = set $redis "ca_file" "/etc/kas/redis-ca/ca.crt" }}
{{- end }}
{{- $_ = set $cfg "redis" $redis }}
{{- end }}
{{- if $v.peers.secretName }}
{{- $peers := dict "listen" (printf "0.0.0.0:%v" $v.peers.port) "secret_file" "/etc/kas/peers/secret" }}
{{- if $v.peers.tlsSecretName }}
{{- $name := $v.peers.tlsServerName | default (printf "%s-peers" (include "kas.fullname" .)) }}
{{- $_ = set $peers "tls" (dict "certificate_file" "/etc/kas/peers-tls/tls.crt" "key_file" "/etc/kas/peers-tls/tls.key" "ca_file" "/etc/kas/peers-tls/ca.crt" "server_name" $name) }}
{{- end }}
{{- $_ = set $cfg "peers" $peers }}
{{- end }}
{{- /* Mirrors on their own volume: their growth must not fill the database's disk. */}}
{{- $_ = set $cfg "git" (dict "cache_dir" "/var/lib/kas-mirrors") }}
{{- /* Checkouts on the Pod's emptyDir, not the (small) data volume; kas owns the folder. */}}
{{- /* Renderers' memory, sized with resources.limits.memory (see values.yaml, `render`). */}}
{{- $render := dict "work_dir" "/tmp/kas-render" "memory_limit" (int64 $v.render.memoryLimit) "max_concurrent" (int $v.render.maxConcurrent) "memory_reserve" (int64 $v.render.memoryReserve) }}
{{- $_ = set $cfg "gitops" (dict "render" $render) }}
{{- /* On SIGTERM: not ready, still serving while the Service and proxies drop the Pod. */}}
{{- $_ = set $cfg "shutdown_delay" .Values.shutdownDelay }}
{{- /* Then: requests in flight on the agents' tunnels finish, agents move elsewhere. */}}
{{- $_ = set $cfg "shutdown_timeout" .Values.shutdownTimeout }}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy $v.config)) }}
{{- end }}

{{/* Several replicas need what they share: fail at install time, naming the value. */}}
{{- define "kas.checkReplicas" -}}
{{- if gt (int .Values.replicas) 1 }}
{{- if not .Values.database.urlSecret.name }}{{ fail "replicas > 1 needs database.urlSecret.name: replicas share PostgreSQL (SQLite has one writer)" }}{{ end }}
{{- if not .Values.redis.url }}{{ fail "replicas > 1 needs redis.url: replicas share revocations, pushes and the agent directory in Redis" }}{{ end }}
{{- if not .Values.peers.secretName }}{{ fail "replicas > 1 needs peers.secretName: a request for an agent on another replica is routed there" }}{{ end }}
{{- if and .Values.api.expose (not .Values.adminToken.secretName) }}{{ fail "replicas > 1 with api.expose needs adminToken.secretName: each replica would make its own admin token, and admin calls through the Service would fail at random" }}{{ end }}
{{- end }}
{{- end }}

{{/*
Refuses to render without this chart's own values (see valuesVersion in values.yaml). Included
first in every template, so that it is the error helm reports rather than a template failing on
a key the release's values lack.
*/}}
{{- define "kas.valuesInForce" -}}
{{- if ne (toString .Values.valuesVersion) "1" -}}
{{- fail (printf "the values of this chart version are missing (valuesVersion %s, expected 1): helm upgrade --reuse-values keeps the values of the chart version the release was installed with, without the keys added since. Upgrade with --reset-then-reuse-values (Helm 3.14+), or with -f and your values file (docs/UPGRADING.md)" (.Values.valuesVersion | default "none" | toString)) -}}
{{- end -}}
{{- end -}}
