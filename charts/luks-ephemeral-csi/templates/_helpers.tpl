{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "luks-ephemeral-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name if it already contains the chart name, else
"<release>-<chart>". Suffixes like "-node" are added by the templates, so keep room for them.
*/}}
{{- define "luks-ephemeral-csi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "luks-ephemeral-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "node"). */}}
{{- define "luks-ephemeral-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "luks-ephemeral-csi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels of one component: include with (dict "root" $ "component" "node"). */}}
{{- define "luks-ephemeral-csi.labels" -}}
helm.sh/chart: {{ include "luks-ephemeral-csi.chart" .root }}
{{ include "luks-ephemeral-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: luks-ephemeral-csi
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "luks-ephemeral-csi.nodeServiceAccountName" -}}
{{- if .Values.node.serviceAccount.create }}
{{- default (printf "%s-node" (include "luks-ephemeral-csi.fullname" .)) .Values.node.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.node.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The driver image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "luks-ephemeral-csi.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A sidecar image from its values block: repository@digest, else repository:tag. */}}
{{- define "luks-ephemeral-csi.sidecarImage" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* The plugin directory kubelet reaches the driver's socket through. */}}
{{- define "luks-ephemeral-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName }}
{{- end }}

{{/* "true" when the csi-resizer Deployment is rendered: it needs the controller service. */}}
{{- define "luks-ephemeral-csi.resizerEnabled" -}}
{{- and .Values.controller.enabled .Values.resizer.enabled }}
{{- end }}

{{- define "luks-ephemeral-csi.controllerServiceAccountName" -}}
{{- if .Values.resizer.serviceAccount.create }}
{{- default (printf "%s-controller" (include "luks-ephemeral-csi.fullname" .)) .Values.resizer.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.resizer.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* qemu-storage-daemon's directory in the state dir: its QMP and NBD sockets. */}}
{{- define "luks-ephemeral-csi.qsdDir" -}}
{{- printf "%s/qsd" (trimSuffix "/" .Values.node.stateDir) }}
{{- end }}

{{- define "luks-ephemeral-csi.registrationDir" -}}
{{- printf "%s/plugins_registry" (trimSuffix "/" .Values.kubeletDir) }}
{{- end }}

{{/*
A size for the driver's flags: strings are passed through (the schema checked them), numbers
are printed as whole bytes, never in float notation such as 1e+09.
*/}}
{{- define "luks-ephemeral-csi.quantity" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}

{{/* Namespace of an optional monitoring object: its own setting, else the release's. */}}
{{- define "luks-ephemeral-csi.monitoringNamespace" -}}
{{- default .root.Release.Namespace .namespace }}
{{- end }}

{{/*
Sidecars need no privilege: they only talk to the driver's socket, and the registrar writes its
own socket in the registration dir. They run as root (uid 0) only because the socket and the
registration dir are root's; every capability is dropped.
*/}}
{{- define "luks-ephemeral-csi.sidecarSecurityContext" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The livenessprobe sidecar: serves /healthz on node.healthPort by calling the driver's Probe over
the socket in the volume named `socketVolume`. Shared by the node and the controller pods.
*/}}
{{- define "luks-ephemeral-csi.livenessProbeContainer" -}}
{{- $probe := .root.Values.sidecars.livenessProbe -}}
- name: liveness-probe
  image: {{ include "luks-ephemeral-csi.sidecarImage" $probe.image }}
  imagePullPolicy: {{ $probe.image.pullPolicy }}
  args:
    - --v={{ $probe.logLevel }}
    - --csi-address=/csi/csi.sock
    - --health-port={{ .root.Values.node.healthPort }}
  securityContext:
    {{- include "luks-ephemeral-csi.sidecarSecurityContext" .root | nindent 4 }}
  resources:
    {{- toYaml $probe.resources | nindent 4 }}
  volumeMounts:
    - name: {{ .socketVolume }}
      mountPath: /csi
{{- end }}

{{/*
The pods do not get the automatic ServiceAccount token (automountServiceAccountToken: false):
only the containers that call the API server mount this volume, at the path of the automatic
one, with the same three files (token, ca.crt, namespace), so in-cluster client configuration
(the driver's kubernetes client, client-go in the sidecars) works unchanged. kubelet renews the
token before it expires; both clients re-read it.
*/}}
{{- define "luks-ephemeral-csi.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 420  # 0644 in decimal, as kubelet's own kube-api-access volume
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}

{{- define "luks-ephemeral-csi.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}
