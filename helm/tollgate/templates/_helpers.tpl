{{- define "tollgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tollgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollgate.labels" -}}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tollgate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* tollgate's config.yaml: the user's sections plus what the chart owns. */}}
{{- define "tollgate.config" -}}
{{- $c := deepCopy .Values.tollgate.config -}}
{{- $up := merge (dict "url" (printf "http://127.0.0.1:%v" .Values.modelServer.port)) (default (dict) $c.upstream) -}}
{{- if .Values.tollgate.upstreamApiKey.existingSecret -}}
{{- $_ := set $up "api_key_env" "TOLLGATE_UPSTREAM_API_KEY" -}}
{{- end -}}
{{- $_ := set $c "upstream" $up -}}
{{- $_ := set $c "listen" "0.0.0.0:8080" -}}
{{- $_ := set $c "admin_listen" "0.0.0.0:9090" -}}
{{- $pg := .Values.tollgate.store.postgres -}}
{{- if $pg.enabled -}}
{{- /* The URL holds a password: only its variable's name is in the config (see tollgate.container). */ -}}
{{- $_ := set $c "store" (dict "postgres" (dict "url_env" "TOLLGATE_POSTGRES_URL" "pool_size" $pg.poolSize "connect_timeout" $pg.connectTimeout "statement_timeout" $pg.statementTimeout)) -}}
{{- else -}}
{{- $_ := set $c "store" (dict "sqlite" "/var/lib/tollgate/tollgate.db") -}}
{{- end -}}
{{- $rd := .Values.tollgate.rateLimits.redis -}}
{{- if $rd.enabled -}}
{{- /* One limit for every replica. The user's other rate_limits fields (per, overrides) stay;
       backend and redis belong to the chart (the schema refuses them in tollgate.config). */ -}}
{{- $rl := deepCopy (default (dict) $c.rate_limits) -}}
{{- $_ := set $rl "backend" "redis" -}}
{{- $_ := set $rl "redis" (dict "url_env" "TOLLGATE_REDIS_URL" "key_prefix" $rd.keyPrefix "timeout" $rd.timeout "on_error" $rd.onError "concurrency_lease" $rd.concurrencyLease "debit_requests" $rd.debitRequests "debit_within" $rd.debitWithin) -}}
{{- $_ := set $c "rate_limits" $rl -}}
{{- end -}}
{{- $sd := .Values.tollgate.shutdown -}}
{{- $_ := set $c "shutdown" (dict "drain_delay" (printf "%vs" $sd.drainDelaySeconds) "timeout" (printf "%vs" $sd.timeoutSeconds)) -}}
{{- if .Values.tollgate.tls.enabled -}}
{{- $_ := set $c "tls" (dict "cert" "/etc/tollgate/tls/tls.crt" "key" "/etc/tollgate/tls/tls.key") -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* Values the schema cannot explain well: fail the render with what to set. */}}
{{- define "tollgate.validate" -}}
{{- $pg := .Values.tollgate.store.postgres -}}
{{- if not $pg.enabled -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail "autoscaling.enabled runs more than one replica, but the SQLite key store is a file of one pod: replicas would not share keys. Configure tollgate.store.postgres (enabled: true, existingSecret: the Secret holding the PostgreSQL URL) to run many replicas." -}}
{{- end -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail (printf "replicaCount is %v, but the SQLite key store is a file of one pod: replicas would not share keys. Configure tollgate.store.postgres (enabled: true, existingSecret: the Secret holding the PostgreSQL URL) to run many replicas, or set replicaCount: 1." .Values.replicaCount) -}}
{{- end -}}
{{- else if not $pg.existingSecret -}}
{{- fail (printf "tollgate.store.postgres.enabled needs tollgate.store.postgres.existingSecret: the name of a Secret holding the PostgreSQL URL (postgres://user:password@host:5432/db) under the key %q (tollgate.store.postgres.key). The URL is never put in the ConfigMap." $pg.key) -}}
{{- end -}}
{{- $rd := .Values.tollgate.rateLimits.redis -}}
{{- if and $rd.enabled (not $rd.existingSecret) -}}
{{- fail (printf "tollgate.rateLimits.redis.enabled needs tollgate.rateLimits.redis.existingSecret: the name of a Secret holding the Redis URL (redis://[user:password@]host:6379[/db], or rediss:// for TLS) under the key %q (tollgate.rateLimits.redis.key). The URL is never put in the ConfigMap." $rd.key) -}}
{{- end -}}
{{- end -}}

{{/* How many replicas (at most) enforce limits locally, when more than one: each admits a whole
     tier. Empty with Redis or one replica. */}}
{{- define "tollgate.limitsPerReplica" -}}
{{- if not .Values.tollgate.rateLimits.redis.enabled -}}
{{- if .Values.autoscaling.enabled -}}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 -}}
{{- printf "%v" .Values.autoscaling.maxReplicas -}}
{{- end -}}
{{- else if gt (int .Values.replicaCount) 1 -}}
{{- printf "%v" .Values.replicaCount -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Long enough for preStop, the drain delay, in-flight requests, and a margin. */}}
{{- define "tollgate.gracePeriod" -}}
{{- $sd := .Values.tollgate.shutdown -}}
{{- add $sd.preStopSeconds $sd.drainDelaySeconds $sd.timeoutSeconds 10 -}}
{{- end -}}

{{/* The store URLs, from their Secrets, in the variables the config names
     (store.postgres.url_env, rate_limits.redis.url_env): the server's and the check Job's. */}}
{{- define "tollgate.secretEnv" -}}
{{- $pg := .Values.tollgate.store.postgres -}}
{{- $rd := .Values.tollgate.rateLimits.redis -}}
{{- if $pg.enabled }}
- name: TOLLGATE_POSTGRES_URL
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.key }}
{{- end }}
{{- if $rd.enabled }}
- name: TOLLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $rd.existingSecret }}
      key: {{ $rd.key }}
{{- end }}
{{- end -}}

{{- define "tollgate.container" -}}
name: tollgate
image: {{ include "tollgate.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve", "--config", "/etc/tollgate/conf/config.yaml"]
env:
  - name: TOLLGATE_CONFIG
    value: /etc/tollgate/conf/config.yaml
  {{- if .Values.tollgate.upstreamApiKey.existingSecret }}
  - name: TOLLGATE_UPSTREAM_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ .Values.tollgate.upstreamApiKey.existingSecret }}
        key: {{ .Values.tollgate.upstreamApiKey.key }}
  {{- end }}
  {{- with include "tollgate.secretEnv" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with .Values.tollgate.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: http
    containerPort: 8080
    protocol: TCP
  - name: admin
    containerPort: 9090
    protocol: TCP
readinessProbe:
  httpGet: { path: /readyz, port: admin }
  periodSeconds: 2
  failureThreshold: 1
livenessProbe:
  httpGet: { path: /healthz, port: admin }
  periodSeconds: 10
  failureThreshold: 3
startupProbe:
  httpGet: { path: /healthz, port: admin }
  periodSeconds: 1
  failureThreshold: 30
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.tollgate.shutdown.preStopSeconds }}
resources:
  {{- toYaml .Values.tollgate.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  # A directory mount, not subPath: the kubelet only updates whole-volume mounts, and tollgate
  # reloads the file when it changes.
  - name: config
    mountPath: /etc/tollgate/conf
    readOnly: true
  {{- if not .Values.tollgate.store.postgres.enabled }}
  - name: store
    mountPath: /var/lib/tollgate
  {{- end }}
  {{- if .Values.tollgate.tls.enabled }}
  - name: tls
    mountPath: /etc/tollgate/tls
    readOnly: true
  {{- end }}
{{- end -}}
