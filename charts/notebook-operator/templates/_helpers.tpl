{{/* Names: <release>-<chart> unless the release name holds the chart name; 63 characters at most. */}}
{{- define "notebook-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "notebook-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "notebook-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "notebook-operator.labels" -}}
helm.sh/chart: {{ include "notebook-operator.chart" . }}
app.kubernetes.io/name: {{ include "notebook-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "notebook-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "notebook-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per component: (dict "root" $ "component" "controller"). */}}
{{- define "notebook-operator.componentLabels" -}}
{{ include "notebook-operator.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "notebook-operator.componentSelectorLabels" -}}
{{ include "notebook-operator.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "notebook-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "notebook-operator.controllerServiceAccount" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "notebook-operator.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "notebook-operator.apiServiceAccount" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (printf "%s-api" (include "notebook-operator.fullname" .)) .Values.api.serviceAccount.name }}
{{- else }}
{{- required "api.serviceAccount.name is required when api.serviceAccount.create is false" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "notebook-operator.tokenSecret" -}}
{{- default (printf "%s-api-token" (include "notebook-operator.fullname" .)) .Values.api.auth.existingSecret }}
{{- end }}

{{- define "notebook-operator.notebookConfigMap" -}}
{{- printf "%s-notebook" (include "notebook-operator.fullname" .) }}
{{- end }}

{{/* The API's notebook flag; fails on more than one source. */}}
{{- define "notebook-operator.notebookArg" -}}
{{- $nb := .Values.api.notebook }}
{{- $set := 0 }}
{{- range $source := list $nb.content $nb.configMap $nb.path }}{{ if $source }}{{ $set = add1 $set }}{{ end }}{{ end }}
{{- if gt $set 1 }}
{{- fail "api.notebook: set at most one of content, configMap and path" }}
{{- end }}
{{- if $nb.path }}
{{- printf "--notebook-path=%s" $nb.path }}
{{- else if $nb.configMap }}
{{- printf "--notebook-configmap=%s" $nb.configMap }}
{{- else }}
{{- printf "--notebook-configmap=%s/notebook.ipynb" (include "notebook-operator.notebookConfigMap" .) }}
{{- end }}
{{- end }}

{{/* Pod and container security: non-root, read-only root, no privilege, no capabilities. */}}
{{- define "notebook-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "notebook-operator.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* RBAC rules. The controller: the one writer of Leases and Jobs (DESIGN §4). */}}
{{- define "notebook-operator.controllerRules" -}}
- apiGroups: ["notebooks.dev"]
  resources: ["notebookruns"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "delete", "patch", "update"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookruns/finalizers"]
  verbs: ["update"]
# delete: a stopping run stops its pods itself, also one orphaned from its Job.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Schedules: read them, record their status, create each tick's run (owned by the schedule:
# finalizers/update lets the owner reference block the schedule's deletion).
- apiGroups: ["notebooks.dev"]
  resources: ["notebookschedules"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookschedules/status"]
  verbs: ["get", "patch"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookschedules/finalizers"]
  verbs: ["update"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookruns"]
  verbs: ["create"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Webhook URLs of spec.notify, read by name when a run ends; never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/* The API: creates and reads runs, never Leases or Jobs. */}}
{{- define "notebook-operator.apiRules" -}}
- apiGroups: ["notebooks.dev"]
  resources: ["notebookruns"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# Schedules: list and read them, suspend and resume (patch), run one now (a run it owns).
- apiGroups: ["notebooks.dev"]
  resources: ["notebookschedules"]
  verbs: ["get", "list", "patch"]
- apiGroups: ["notebooks.dev"]
  resources: ["notebookschedules/finalizers"]
  verbs: ["update"]
{{- end }}

{{/*
The results store (docs/results.md), as env of the controller and the API: the same store for both.
*/}}
{{- define "notebook-operator.resultsEnv" -}}
- name: NOTEBOOK_OPERATOR_RESULTS_STORE
  value: {{ .Values.results.store | quote }}
{{- if eq .Values.results.store "s3" }}
{{- $s3 := .Values.results.s3 }}
{{- with $s3.endpoint }}
- name: NOTEBOOK_OPERATOR_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: NOTEBOOK_OPERATOR_S3_BUCKET
  value: {{ $s3.bucket | quote }}
- name: NOTEBOOK_OPERATOR_S3_REGION
  value: {{ $s3.region | quote }}
- name: NOTEBOOK_OPERATOR_S3_PREFIX
  value: {{ $s3.prefix | quote }}
{{- if $s3.allowHttp }}
- name: NOTEBOOK_OPERATOR_S3_ALLOW_HTTP
  value: "true"
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}
