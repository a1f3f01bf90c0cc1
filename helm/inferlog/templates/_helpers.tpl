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
Checks across values that values.schema.json cannot express. Consumers beyond the
partition count get no partitions: they would hold a GPU and do nothing.
*/}}
{{- define "inferlog.validate" -}}
{{- $v := .Values -}}
{{- $per := include "inferlog.consumersPerPod" . | int -}}
{{- $parts := $v.kafka.partitions | int -}}
{{- if $v.keda.enabled -}}
  {{- if gt (mul ($v.keda.maxReplicaCount | int) $per) $parts -}}
    {{- fail (printf "keda.maxReplicaCount (%d) x consumers per pod (%d) exceeds kafka.partitions (%d): the extra workers would get no partitions" ($v.keda.maxReplicaCount | int) $per $parts) -}}
  {{- end -}}
  {{- if gt ($v.keda.minReplicaCount | int) ($v.keda.maxReplicaCount | int) -}}
    {{- fail "keda.minReplicaCount exceeds keda.maxReplicaCount" -}}
  {{- end -}}
{{- else if gt (mul ($v.replicas | int) $per) $parts -}}
  {{- fail (printf "replicas (%d) x consumers per pod (%d) exceeds kafka.partitions (%d): the extra workers would get no partitions" ($v.replicas | int) $per $parts) -}}
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

{{/* Kafka connection and topics, shared by the workers and the topic Job. */}}
{{- define "inferlog.kafkaEnv" -}}
- name: INFERLOG_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: INFERLOG_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: INFERLOG_REQUESTS_TOPIC
  value: {{ .Values.kafka.topics.requests | quote }}
- name: INFERLOG_HIGH_PRIORITY_TOPIC
  value: {{ .Values.kafka.topics.high | quote }}
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
