{{/* Names, truncated to the 63 characters a label value allows. */}}
{{- define "inferlog.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferlog.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "inferlog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferlog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "inferlog.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "inferlog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "inferlog.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferlog.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "inferlog.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Consumers per pod: `inferlog worker --processes auto` runs processesPerGpu per visible GPU. */}}
{{- define "inferlog.consumersPerPod" -}}
{{- if .Values.gpu.enabled }}{{ mul (.Values.gpu.count | int) (.Values.gpu.processesPerGpu | default 1 | int) }}{{ else }}1{{ end -}}
{{- end -}}

{{/*
Checks across values that values.schema.json cannot express, for one model (a ctx of
inferlog.servedModels): each model's topics have kafka.partitions partitions, and consumers
beyond them get none: they would hold a GPU and do nothing.
*/}}
{{- define "inferlog.validate" -}}
{{- $v := .Values -}}
{{- $who := ternary "" (printf "models %s: " .Model.name) .Model.legacy -}}
{{- $per := include "inferlog.consumersPerPod" . | int -}}
{{- $parts := $v.kafka.partitions | int -}}
{{- if $v.keda.enabled -}}
  {{- if gt (mul ($v.keda.maxReplicaCount | int) $per) $parts -}}
    {{- fail (printf "%skeda.maxReplicaCount (%d) x consumers per pod (%d) exceeds kafka.partitions (%d): the extra workers would get no partitions" $who ($v.keda.maxReplicaCount | int) $per $parts) -}}
  {{- end -}}
  {{- if gt ($v.keda.minReplicaCount | int) ($v.keda.maxReplicaCount | int) -}}
    {{- fail (printf "%skeda.minReplicaCount exceeds keda.maxReplicaCount" $who) -}}
  {{- end -}}
{{- else if gt (mul ($v.replicas | int) $per) $parts -}}
  {{- fail (printf "%sreplicas (%d) x consumers per pod (%d) exceeds kafka.partitions (%d): the extra workers would get no partitions" $who ($v.replicas | int) $per $parts) -}}
{{- end -}}
{{- if and $v.kafka.sasl.enabled (not (hasPrefix "SASL_" $v.kafka.securityProtocol)) -}}
  {{- fail "kafka.sasl.enabled needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL" -}}
{{- end -}}
{{- if and (hasPrefix "SASL_" $v.kafka.securityProtocol) (not $v.kafka.sasl.enabled) -}}
  {{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.enabled and kafka.sasl.existingSecret" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and $v.kafka.sasl.enabled (not $v.kafka.sasl.existingSecret) -}}
  {{- fail "kafka.sasl.existingSecret must name the Secret with the SASL username and password" -}}
{{- end -}}
{{- if and $v.kafka.tls.enabled (not (has $v.kafka.securityProtocol (list "SSL" "SASL_SSL"))) -}}
  {{- fail "kafka.tls.enabled needs kafka.securityProtocol SSL or SASL_SSL" -}}
{{- end -}}
{{- if and $v.kafka.tls.enabled (not $v.kafka.tls.caSecret) (not $v.kafka.tls.clientCertSecret) -}}
  {{- fail "kafka.tls.enabled needs kafka.tls.caSecret (the brokers' CA) and/or kafka.tls.clientCertSecret" -}}
{{- end -}}
{{- end -}}

{{/* Kafka connection and topics, shared by the workers and the topic Job: each model's
request topics are these two, each followed by .<its topic segment> (topicLayout per-model). */}}
{{- define "inferlog.kafkaEnv" -}}
- name: INFERLOG_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: INFERLOG_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: INFERLOG_REQUESTS_TOPIC
  value: {{ .Values.kafka.topics.requests | quote }}
- name: INFERLOG_HIGH_PRIORITY_TOPIC
  value: {{ .Values.kafka.topics.high | quote }}
- name: INFERLOG_TOPIC_LAYOUT
  value: {{ .Values.kafka.topicLayout | default "per-model" | quote }}
- name: INFERLOG_RESULTS_TOPIC
  value: {{ .Values.kafka.topics.results | quote }}
- name: INFERLOG_DEADLETTER_TOPIC
  value: {{ .Values.kafka.topics.deadletter | quote }}
- name: INFERLOG_PARTITIONS
  value: {{ .Values.kafka.partitions | int | quote }}
- name: INFERLOG_REPLICATION_FACTOR
  value: {{ .Values.kafka.replicationFactor | int | quote }}
- name: INFERLOG_RETENTION_MS
  value: {{ .Values.kafka.retentionMs | int64 | quote }}
{{- with .Values.kafka.sasl }}
{{- if .enabled }}
- name: INFERLOG_SASL_MECHANISM
  value: {{ .mechanism | quote }}
- name: INFERLOG_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
- name: INFERLOG_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- with .Values.kafka.tls }}
{{- if and .enabled .caSecret }}
- name: INFERLOG_SSL_CAFILE
  value: /etc/inferlog/kafka-ca/{{ .caKey }}
{{- end }}
{{- if and .enabled .clientCertSecret }}
- name: INFERLOG_SSL_CERTFILE
  value: /etc/inferlog/kafka-client/tls.crt
- name: INFERLOG_SSL_KEYFILE
  value: /etc/inferlog/kafka-client/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{- define "inferlog.kafkaVolumes" -}}
{{- with .Values.kafka.tls }}
{{- if and .enabled .caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .caSecret }}
    items:
      - key: {{ .caKey }}
        path: {{ .caKey }}
{{- end }}
{{- if and .enabled .clientCertSecret }}
- name: kafka-client
  secret:
    secretName: {{ .clientCertSecret }}
    defaultMode: 0440  # group-readable: fsGroup is the worker's group
{{- end }}
{{- end }}
{{- end -}}

{{- define "inferlog.kafkaVolumeMounts" -}}
{{- with .Values.kafka.tls }}
{{- if and .enabled .caSecret }}
- name: kafka-ca
  mountPath: /etc/inferlog/kafka-ca
  readOnly: true
{{- end }}
{{- if and .enabled .clientCertSecret }}
- name: kafka-client
  mountPath: /etc/inferlog/kafka-client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/*
The served name of a model given as dict model/modelName, as `inferlog worker` derives it
(inferlog/settings.py served_name_of): modelName, else the embedded default's name, a
folder's name (a hub cache snapshot's repository), or a hub id as it is.
*/}}
{{- define "inferlog.servedName" -}}
{{- if .modelName -}}
{{- .modelName -}}
{{- else if not .model -}}
all-MiniLM-L6-v2
{{- else if or (hasPrefix "/" .model) (hasPrefix "." .model) -}}
{{- $p := trimSuffix "/" .model -}}
{{- if and (eq (base (dir $p)) "snapshots") (hasPrefix "models--" (base (dir (dir $p)))) -}}
{{- base (dir (dir $p)) | trimPrefix "models--" | replace "--" "/" -}}
{{- else -}}
{{- base $p -}}
{{- end -}}
{{- else -}}
{{- .model -}}
{{- end -}}
{{- end -}}

{{/* A served name as a part of topic and group names: inferlog/settings.py topic_segment. */}}
{{- define "inferlog.topicSegment" -}}
{{- $seg := regexReplaceAll "[^A-Za-z0-9_-]" . "_" | trunc 120 -}}
{{- if eq $seg . -}}{{ $seg }}{{- else -}}{{ printf "%s-%s" $seg (sha256sum . | trunc 8) }}{{- end -}}
{{- end -}}

{{/* A served name in object names: lower case, each run of other characters than letters
and digits a -, at most 40 characters (rendering fails when two models' names meet). */}}
{{- define "inferlog.modelKey" -}}
{{- regexReplaceAll "[^a-z0-9]+" (lower .) "-" | trimAll "-" | trunc 40 | trimSuffix "-" | default "model" -}}
{{- end -}}

{{/* A served name as the value of the inferlog.dev/model label: as it is where a label
value allows it, else as in object names. */}}
{{- define "inferlog.modelLabel" -}}
{{- if and (regexMatch "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$" .) (le (len .) 63) -}}
{{- . -}}
{{- else -}}
{{- include "inferlog.modelKey" . -}}
{{- end -}}
{{- end -}}

{{/*
The served models, each with its own workers, request topics (both tiers), consumer group,
KEDA ScaledObject and PodDisruptionBudget: `models`, or without it one model from the
top-level values (the chart before `models`, with its object names). Call with dict "root"
$ "out" $d: sets $d.models to a list of dicts: name (served name), seg, label, objName,
legacy, topics (high tier first), group, and ctx, a template context whose .Values are the
chart's with the model's overrides.
*/}}
{{- define "inferlog.servedModels" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $legacy := not $v.models -}}
{{- $entries := $v.models -}}
{{- if $legacy -}}
{{- $entries = list (dict "name" (include "inferlog.servedName" $v.worker)) -}}
{{- end -}}
{{- $k := $v.kafka -}}
{{- $layout := $k.topicLayout | default "per-model" -}}
{{- if and (eq $layout "shared") (gt (len $entries) 1) -}}
{{- fail "kafka.topicLayout shared has one pair of request topics and one group: it serves one model (models lists more)" -}}
{{- end -}}
{{- $models := list -}}
{{- $seen := dict -}}
{{- range $e := $entries -}}
  {{- $name := $e.name -}}
  {{- if not $name -}}
    {{- fail "every entry of models needs a name: the name its model is served under" -}}
  {{- end -}}
  {{- $seg := include "inferlog.topicSegment" $name -}}
  {{- $label := include "inferlog.modelLabel" $name -}}
  {{- $objName := include "inferlog.fullname" $root -}}
  {{- if not $legacy -}}
    {{- $objName = printf "%s-worker-%s" $objName (include "inferlog.modelKey" $name) | trunc 63 | trimSuffix "-" -}}
  {{- end -}}
  {{- range $pair := list (list "served name" $name) (list "inferlog.dev/model label" $label) (list "object name" $objName) -}}
    {{- $what := index $pair 0 -}}{{- $val := index $pair 1 -}}
    {{- $id := printf "%s %s" $what $val -}}
    {{- if hasKey $seen $id -}}
      {{- fail (printf "models: two models have the %s %q: give each a name of its own (object names are the served name in lower case, other characters than letters and digits as -, cut to 63 characters with the release's name)" $what $val) -}}
    {{- end -}}
    {{- $_ := set $seen $id true -}}
  {{- end -}}
  {{- $topics := list $k.topics.high $k.topics.requests -}}
  {{- $group := $k.groupId -}}
  {{- if ne $layout "shared" -}}
    {{- $topics = list (printf "%s.%s" $k.topics.high $seg) (printf "%s.%s" $k.topics.requests $seg) -}}
    {{- $group = printf "%s.%s" $k.groupId $seg -}}
    {{- range $t := $topics -}}
      {{- if has $t (list $k.topics.high $k.topics.requests) -}}
        {{- fail (printf "model name %q would read the shared topic %q: serve it under another name" $name $t) -}}
      {{- end -}}
    {{- end -}}
  {{- end -}}
  {{- /* the model's values: the chart's, with the entry's overrides (the maps among them merged key by key) */ -}}
  {{- $mv := dict -}}
  {{- range $field, $val := $v -}}{{- $_ := set $mv $field $val -}}{{- end -}}
  {{- range $field := list "replicas" "resources" "nodeSelector" "tolerations" "affinity" "extraVolumes" "extraVolumeMounts" -}}
    {{- if hasKey $e $field -}}{{- $_ := set $mv $field (get $e $field) -}}{{- end -}}
  {{- end -}}
  {{- range $field := list "image" "gpu" "keda" "worker" -}}
    {{- $merged := dict -}}
    {{- range $sub, $val := get $v $field | default dict -}}{{- $_ := set $merged $sub $val -}}{{- end -}}
    {{- range $sub, $val := get $e $field | default dict -}}{{- $_ := set $merged $sub $val -}}{{- end -}}
    {{- $_ := set $mv $field $merged -}}
  {{- end -}}
  {{- if not $legacy -}}
    {{- $w := $mv.worker -}}
    {{- $_ := set $w "model" ($e.model | default "") -}}
    {{- $_ := set $w "modelName" $name -}}
    {{- $_ := set $w "task" ($e.task | default "") -}}
    {{- $_ := set $w "extraEnv" (concat ($w.extraEnv | default list) ($e.env | default list)) -}}
  {{- end -}}
  {{- $m := dict "name" $name "seg" $seg "label" $label "objName" $objName "legacy" $legacy "topics" $topics "group" $group "layout" $layout -}}
  {{- $ctx := dict "Values" $mv "Release" $root.Release "Chart" $root.Chart "Capabilities" $root.Capabilities "Template" $root.Template "Files" $root.Files "Model" $m -}}
  {{- $models = append $models (set $m "ctx" $ctx) -}}
{{- end -}}
{{- $_ := set .out "models" $models -}}
{{- end -}}

{{/* A model's worker pods (ctx of inferlog.servedModels): the chart's worker selector, and
each model's own label except the single worker of the chart before `models` (a selector
cannot change). */}}
{{- define "inferlog.workerSelectorLabels" -}}
{{- include "inferlog.selectorLabels" . }}
{{- if not .Model.legacy }}
inferlog.dev/model: {{ .Model.label | quote }}
{{- end }}
{{- end -}}

{{/* The most consumers a pod of any model runs: the metrics ports the Service exposes. */}}
{{- define "inferlog.maxConsumersPerPod" -}}
{{- $all := dict -}}
{{- include "inferlog.servedModels" (dict "root" . "out" $all) -}}
{{- $n := 1 -}}
{{- range $m := $all.models -}}{{- $n = max $n (include "inferlog.consumersPerPod" $m.ctx | int) -}}{{- end -}}
{{- $n -}}
{{- end -}}
