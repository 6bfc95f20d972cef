{{/* Chart name, overridable with nameOverride. */}}
{{- define "llm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every object's name. The release name alone when it already contains
the chart name (`helm install llm-operator ...` gives "llm-operator"), else "<release>-<name>".
*/}}
{{- define "llm-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name prefix of cluster-scoped objects (ClusterRoles and their bindings): unique per release
namespace too, so the same release name in two namespaces does not collide. Not truncated: RBAC
names may be up to 253 characters, and cutting them could make two releases collide.
*/}}
{{- define "llm-operator.clusterName" -}}
{{- $full := include "llm-operator.fullname" . }}
{{- if eq .Release.Namespace $full }}
{{- $full }}
{{- else }}
{{- printf "%s-%s" .Release.Namespace $full }}
{{- end }}
{{- end }}

{{- define "llm-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "llm-operator.labels" -}}
helm.sh/chart: {{ include "llm-operator.chart" . }}
app.kubernetes.io/name: {{ include "llm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (operator or gateway). Call with (list $ "operator"). */}}
{{- define "llm-operator.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "llm-operator.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of one component. Call with (list $ "operator"). */}}
{{- define "llm-operator.componentLabels" -}}
{{ include "llm-operator.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "llm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-operator.gatewayName" -}}
{{- printf "%s-gateway" (include "llm-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-operator.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "llm-operator.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The watched namespaces, de-duplicated, in the order given. */}}
{{- define "llm-operator.watchNamespaces" -}}
{{- toJson (uniq .Values.watchNamespaces) }}
{{- end }}

{{/* "true" when the operator watches every namespace. */}}
{{- define "llm-operator.clusterWide" -}}
{{- if empty .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The operator's namespaced rules: its own resource, the children it owns, and Events.
Exactly the calls the operator makes; no "*", no Secrets (pods reference Secrets by name only).
*/}}
{{- define "llm-operator.operatorRules" -}}
# The LLMDeployments it reconciles: kopf lists and watches them and patches its finalizer and
# annotations; the operator reads one before acting on it.
- apiGroups: ["llmoperator.io"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# Status is the only thing the operator writes about an LLMDeployment (never its spec).
- apiGroups: ["llmoperator.io"]
  resources: ["llmdeployments/status"]
  verbs: ["patch"]
# The Secrets external fallbacks name (routing.fallbacks[].apiKeySecretRef), read one by one
# by name and copied for the gateway: get only, never list or watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The children it owns: server-side apply (create + patch), watches for drift, prunes. No get:
# they are watched, never read by name (tests/chart/test_rbac_used.py), except the routing
# table's ConfigMap.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# NetworkPolicies of the engines (networkPolicy.enabled): applied and pruned like the others,
# and granted with the setting off too, so the operator can delete the ones it made before.
# No get: nothing reads one by name.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
{{- if .Values.keda.enabled }}
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
{{- if .Values.operator.prometheusOperator }}
# Per-LLMDeployment PodMonitors and PrometheusRules (spec.monitoring). No get: nothing reads
# one by name.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors", "prometheusrules"]
  verbs: ["list", "watch", "create", "patch", "delete"]
{{- end }}
# The engine pods: listed by label while a model's replicas are not ready, to say why in its
# status (crash loop, image pull, scheduling), and every 15 s for stalls and GPU cost; deleted
# when stalled (docs/operations.md). Never watched, never patched.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
# Events about LLMDeployments: POSTed to core/v1 only (the operator's and kopf's), never patched.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* kopf peering rules for namespaced KopfPeerings (HA with watchNamespaces). */}}
{{- define "llm-operator.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  resourceNames: [{{ .Values.ha.peeringName | quote }}]
  verbs: ["get", "patch"]
{{- end }}

{{/* Pod anti-affinity that spreads replicas of one component over nodes. (list $ "operator") */}}
{{- define "llm-operator.spreadAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "llm-operator.selectorLabels" . | nindent 12 }}
{{- end }}

{{/*
A label selector written as `kubectl -l` takes it (k=v, k==v, k!=v, k, !k, comma-separated) as
a LabelSelector, the same reading as the operator's (render/label_selector.py).
*/}}
{{- define "llm-operator.labelSelector" -}}
{{- $labels := dict }}
{{- $expressions := list }}
{{- range $term := splitList "," . }}
{{- $term = trim $term }}
{{- if not $term }}
{{- else if contains "!=" $term }}
{{- $parts := splitn "!=" 2 $term }}
{{- $expressions = append $expressions (dict "key" (trim $parts._0) "operator" "NotIn" "values" (list (trim $parts._1))) }}
{{- else if contains "=" $term }}
{{- $parts := splitn "=" 2 (replace "==" "=" $term) }}
{{- $_ := set $labels (trim $parts._0) (trim $parts._1) }}
{{- else if hasPrefix "!" $term }}
{{- $expressions = append $expressions (dict "key" (trimPrefix "!" $term | trim) "operator" "DoesNotExist") }}
{{- else }}
{{- $expressions = append $expressions (dict "key" $term "operator" "Exists") }}
{{- end }}
{{- end }}
{{- $selector := dict }}
{{- if $labels }}{{ $_ := set $selector "matchLabels" $labels }}{{ end }}
{{- if $expressions }}{{ $_ := set $selector "matchExpressions" $expressions }}{{ end }}
{{- toYaml $selector }}
{{- end }}
