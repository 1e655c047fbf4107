{{/*
The release's objects are named after it: the release name when it already says sds-agent,
else <release>-sds-agent.
*/}}
{{- define "sds-agent.fullname" -}}
{{- if contains "sds-agent" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-sds-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sds-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: sds-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* What selects the node agents' pods: stable across upgrades. */}}
{{- define "sds-agent.selectorLabels" -}}
app.kubernetes.io/name: sds-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "sds-agent.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* Where the agent finds what the backend needs: the same paths in both modes. */}}
{{- define "sds-agent.tokenDir" -}}/var/run/secrets/tokens{{- end -}}
{{- define "sds-agent.istioRootDir" -}}/var/run/secrets/istio{{- end -}}
{{- define "sds-agent.embeddedCaDir" -}}/etc/sds-agent/ca{{- end -}}
{{- define "sds-agent.socketDir" -}}/var/run/secrets/workload-spiffe-uds{{- end -}}

{{/*
The agent's settings that are literal values, as a YAML map of SDS_AGENT_* variables: the
pod-mode ConfigMap holds them, the node-mode DaemonSet sets them. Every name is a flag of
`sds-agent run` (docs/configuration.md); the chart's test checks it.
*/}}
{{- define "sds-agent.settings" -}}
{{- $ca := .Values.ca -}}
SDS_AGENT_CA: {{ $ca.backend | quote }}
SDS_AGENT_TRUST_DOMAIN: {{ .Values.trustDomain | quote }}
SDS_AGENT_SOCKET: {{ printf "%s/socket" (include "sds-agent.socketDir" .) | quote }}
SDS_AGENT_ADMIN_ADDR: "127.0.0.1:15020"
SDS_AGENT_STATUS_ADDR: "0.0.0.0:15021"
SDS_AGENT_LOG_FORMAT: {{ .Values.log.format | quote }}
{{- with .Values.log.level }}
SDS_AGENT_LOG_LEVEL: {{ . | quote }}
{{- end }}
{{- if and (eq $ca.backend "embedded") $ca.embedded.secretName }}
SDS_AGENT_EMBEDDED_CA_CERT: {{ printf "%s/ca.pem" (include "sds-agent.embeddedCaDir" .) | quote }}
SDS_AGENT_EMBEDDED_CA_KEY: {{ printf "%s/ca-key.pem" (include "sds-agent.embeddedCaDir" .) | quote }}
{{- else if eq $ca.backend "vault" }}
SDS_AGENT_VAULT_ADDR: {{ $ca.vault.addr | quote }}
SDS_AGENT_VAULT_PKI_MOUNT: {{ $ca.vault.pkiMount | quote }}
SDS_AGENT_VAULT_ROLE: {{ $ca.vault.role | quote }}
SDS_AGENT_VAULT_AUTH: "kubernetes"
SDS_AGENT_VAULT_AUTH_MOUNT: {{ $ca.vault.authMount | quote }}
SDS_AGENT_VAULT_AUTH_ROLE: {{ $ca.vault.authRole | quote }}
SDS_AGENT_VAULT_JWT_FILE: {{ printf "%s/vault-token" (include "sds-agent.tokenDir" .) | quote }}
{{- else if eq $ca.backend "acm-pca" }}
SDS_AGENT_ACM_PCA_ARN: {{ $ca.acmPca.arn | quote }}
{{- else if eq $ca.backend "cert-manager" }}
SDS_AGENT_CERT_MANAGER_ISSUER_NAME: {{ $ca.certManager.issuerName | quote }}
SDS_AGENT_CERT_MANAGER_ISSUER_KIND: {{ $ca.certManager.issuerKind | quote }}
SDS_AGENT_CERT_MANAGER_ISSUER_GROUP: {{ $ca.certManager.issuerGroup | quote }}
{{- else if eq $ca.backend "istiod" }}
SDS_AGENT_CA_ADDR: {{ $ca.istiod.addr | quote }}
SDS_AGENT_CA_ROOT_CERT: {{ printf "%s/root-cert.pem" (include "sds-agent.istioRootDir" .) | quote }}
SDS_AGENT_CA_TOKEN_FILE: {{ printf "%s/istio-token" (include "sds-agent.tokenDir" .) | quote }}
SDS_AGENT_CLUSTER_ID: {{ $ca.istiod.clusterId | quote }}
{{- end }}
{{- if eq .Values.mode "node" }}
{{- $node := .Values.node }}
SDS_AGENT_MODE: "node"
SDS_AGENT_SOCKET_MODE: "0666"
{{- with $node.kubelet.host }}
SDS_AGENT_KUBELET_HOST: {{ . | quote }}
{{- end }}
{{- with $node.kubelet.port }}
SDS_AGENT_KUBELET_PORT: {{ . | quote }}
{{- end }}
{{- with $node.kubelet.readOnlyPort }}
SDS_AGENT_KUBELET_READ_ONLY_PORT: {{ . | quote }}
{{- end }}
{{- if $node.kubelet.caConfigMap }}
SDS_AGENT_KUBELET_CA: "/etc/sds-agent/kubelet-ca/ca.crt"
{{- end }}
{{- if $node.kubelet.skipTlsVerify }}
SDS_AGENT_KUBELET_SKIP_TLS_VERIFY: "true"
{{- end }}
{{- with $node.kubelet.pollInterval }}
SDS_AGENT_KUBELET_POLL_INTERVAL: {{ . | quote }}
{{- end }}
{{- with $node.kubelet.maxAttempts }}
SDS_AGENT_KUBELET_MAX_ATTEMPTS: {{ . | quote }}
{{- end }}
{{- with $node.caConcurrency }}
SDS_AGENT_CA_CONCURRENCY: {{ . | quote }}
{{- end }}
{{- with $node.identityIdleTimeout }}
SDS_AGENT_IDENTITY_IDLE_TIMEOUT: {{ . | quote }}
{{- end }}
{{- if $node.workloadApi }}
SDS_AGENT_WORKLOAD_API_SOCKET: {{ printf "%s/api.sock" (include "sds-agent.socketDir" .) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The settings with extraEnv added, as a map; a name the chart sets already is refused, so that
one setting has one place.
*/}}
{{- define "sds-agent.env" -}}
{{- $env := include "sds-agent.settings" . | fromYaml -}}
{{- range $name, $value := .Values.extraEnv -}}
{{- if hasKey $env $name -}}
{{- fail (printf "extraEnv.%s: the chart sets %s from its own values; change it there" $name $name) -}}
{{- end -}}
{{- $_ := set $env $name (toString $value) -}}
{{- end -}}
{{- toYaml $env -}}
{{- end -}}
