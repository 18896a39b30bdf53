{{/* Base name of every object. */}}
{{- define "imdsgate.fullname" -}}
{{- default "imdsgate" .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "imdsgate.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "imdsgate.server" -}}{{ include "imdsgate.fullname" . }}-server{{- end -}}
{{- define "imdsgate.agent" -}}{{ include "imdsgate.fullname" . }}-agent{{- end -}}
{{- define "imdsgate.webhook" -}}{{ include "imdsgate.fullname" . }}-webhook{{- end -}}

{{/* Labels on every object. */}}
{{- define "imdsgate.labels" -}}
app.kubernetes.io/part-of: imdsgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "imdsgate.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* DNS names of the server's Services: the agents' and the webhook's. */}}
{{- define "imdsgate.serverHost" -}}{{ include "imdsgate.server" . }}.{{ include "imdsgate.namespace" . }}.svc{{- end -}}
{{- define "imdsgate.webhookHost" -}}{{ include "imdsgate.webhook" . }}.{{ include "imdsgate.namespace" . }}.svc{{- end -}}

{{- define "imdsgate.serverTlsSecret" -}}
{{- if eq .Values.tls.source "existingSecret" -}}{{ .Values.tls.existingSecret.server }}{{- else -}}{{ include "imdsgate.server" . }}-tls{{- end -}}
{{- end -}}
{{- define "imdsgate.agentTlsSecret" -}}
{{- if eq .Values.tls.source "existingSecret" -}}{{ .Values.tls.existingSecret.agent }}{{- else -}}{{ include "imdsgate.agent" . }}-tls{{- end -}}
{{- end -}}

{{/* Namespaces the webhook passes unchecked: imdsgate's own first. */}}
{{- define "imdsgate.exemptNamespaces" -}}
{{- $ns := list (include "imdsgate.namespace" .) -}}
{{- range .Values.webhook.exemptNamespaces -}}{{- if not (has . $ns) -}}{{- $ns = append $ns . -}}{{- end -}}{{- end -}}
{{- toJson $ns -}}
{{- end -}}

{{/* Checks that fail the rendering with a message saying what to change. */}}
{{- define "imdsgate.validate" -}}
{{- if semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version -}}
{{- fail (printf "imdsgate needs Kubernetes 1.30 or later (its webhook's matchConditions), not %s. helm template and helm lint assume v1.20.0 unless told: pass your cluster's version, e.g. --kube-version 1.34 (helm install and upgrade read it from the cluster)" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if not (has .Values.tls.source (list "generate" "certManager" "existingSecret")) -}}
{{- fail (printf "tls.source must be generate, certManager or existingSecret, not %q" .Values.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.tls.source "existingSecret") .Values.webhook.enabled (not .Values.tls.existingSecret.caBundle) -}}
{{- fail "tls.source=existingSecret with the webhook enabled needs tls.existingSecret.caBundle (base64 PEM of the CA; scripts/gen-certs.sh prints it)" -}}
{{- end -}}
{{- if not (has .Values.aws.credentialsSource (list "instanceProfile" "irsa" "secret")) -}}
{{- fail (printf "aws.credentialsSource must be instanceProfile, irsa or secret, not %q" .Values.aws.credentialsSource) -}}
{{- end -}}
{{- if and (eq .Values.aws.credentialsSource "irsa") (not .Values.aws.irsaRoleArn) -}}
{{- fail "aws.credentialsSource=irsa needs aws.irsaRoleArn" -}}
{{- end -}}
{{- if and (eq .Values.aws.credentialsSource "secret") (not .Values.aws.credentialsSecret) -}}
{{- fail "aws.credentialsSource=secret needs aws.credentialsSecret (a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)" -}}
{{- end -}}
{{- if not (has .Values.webhook.failurePolicy (list "Fail" "Ignore")) -}}
{{- fail (printf "webhook.failurePolicy must be Fail or Ignore, not %q" .Values.webhook.failurePolicy) -}}
{{- end -}}
{{- if not (has .Values.webhook.mode (list "enforce" "warn")) -}}
{{- fail (printf "webhook.mode must be enforce or warn, not %q" .Values.webhook.mode) -}}
{{- end -}}
{{- $pdb := .Values.server.pdb -}}
{{- if and $pdb.enabled (ge (int .Values.server.replicas) 2) (not (kindIs "string" $pdb.minAvailable)) (ge (int $pdb.minAvailable) (int .Values.server.replicas)) -}}
{{- fail (printf "server.pdb.minAvailable=%v with server.replicas=%v lets no server pod be evicted, so every drain of a server node blocks: set it below server.replicas" $pdb.minAvailable .Values.server.replicas) -}}
{{- end -}}
{{- if not (has .Values.server.podAntiAffinity (list "required" "preferred" "none")) -}}
{{- fail (printf "server.podAntiAffinity must be required, preferred or none, not %q" .Values.server.podAntiAffinity) -}}
{{- end -}}
{{- end -}}

{{/* The server nodes' labels, as JSON. */}}
{{- define "imdsgate.serverNodeLabels" -}}
{{- toJson (default (dict "imdsgate.io/server-node" "true") .Values.server.nodeSelector) -}}
{{- end -}}

{{/* key=value,key=value of the server nodes' labels. */}}
{{- define "imdsgate.serverNodeSelector" -}}
{{- $pairs := list -}}
{{- range $k, $v := (include "imdsgate.serverNodeLabels" . | fromJson) -}}{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* tls.source=generate: a CA and both certificates, made once per rendering and kept across
upgrades (read back from the Secrets when they exist). Sets .Values._imdsgateTls. */}}
{{- define "imdsgate.generatedTls" -}}
{{- if not (hasKey .Values "_imdsgateTls") -}}
{{- $ns := include "imdsgate.namespace" . -}}
{{- $server := lookup "v1" "Secret" $ns (include "imdsgate.serverTlsSecret" .) -}}
{{- $agent := lookup "v1" "Secret" $ns (include "imdsgate.agentTlsSecret" .) -}}
{{- $tls := dict -}}
{{- if and $server $agent $server.data $agent.data (index $server.data "ca.crt") (index $agent.data "tls.crt") -}}
{{- $tls = dict "ca" (index $server.data "ca.crt") "serverCrt" (index $server.data "tls.crt") "serverKey" (index $server.data "tls.key") "agentCrt" (index $agent.data "tls.crt") "agentKey" (index $agent.data "tls.key") -}}
{{- else -}}
{{- $days := int .Values.tls.generatedValidityDays -}}
{{- $ca := genCA "imdsgate-ca" $days -}}
{{- $host := include "imdsgate.serverHost" . -}}
{{- $serverCert := genSignedCert $host nil (list $host (printf "%s.cluster.local" $host) (include "imdsgate.webhookHost" .)) $days $ca -}}
{{- $agentCert := genSignedCert (include "imdsgate.agent" .) nil nil $days $ca -}}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "serverCrt" ($serverCert.Cert | b64enc) "serverKey" ($serverCert.Key | b64enc) "agentCrt" ($agentCert.Cert | b64enc) "agentKey" ($agentCert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "_imdsgateTls" $tls -}}
{{- end -}}
{{- end -}}

{{- define "imdsgate.generatedCaBundle" -}}
{{- include "imdsgate.generatedTls" . -}}
{{- .Values._imdsgateTls.ca -}}
{{- end -}}

{{/* The agents' affinity: agent.affinity, with terms that keep them off the nodes they cannot run
on (not Linux; Fargate, EKS Hybrid Nodes, EKS Auto Mode; virtual-kubelet) and off the server nodes
added to every required node selector term (terms are ORed), whatever agent.affinity says. The same
order as deploy/base/agent.yaml. Also the uninstall hook's, which runs where agents ran. */}}
{{- define "imdsgate.agentAffinity" -}}
{{- $keep := list
  (dict "key" "kubernetes.io/os" "operator" "In" "values" (list "linux"))
  (dict "key" "eks.amazonaws.com/compute-type" "operator" "NotIn" "values" (list "fargate" "hybrid" "auto"))
  (dict "key" "type" "operator" "NotIn" "values" (list "virtual-kubelet")) -}}
{{- /* A server node has every server label (as the webhook judges it): a node lacking any one of
them is a worker. Terms are ORed, so each term of the user's gets one copy per server label, each
copy excluding nodes with that label. */ -}}
{{- $serverLabels := list -}}
{{- range $k, $v := (include "imdsgate.serverNodeLabels" . | fromJson) -}}
{{- $serverLabels = append $serverLabels (dict "key" $k "operator" "NotIn" "values" (list $v)) -}}
{{- end -}}
{{- $affinity := deepCopy (default dict .Values.agent.affinity) -}}
{{- $nodeAffinity := default dict $affinity.nodeAffinity -}}
{{- $required := default dict (get $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution") -}}
{{- $terms := list -}}
{{- range $term := (default (list dict) $required.nodeSelectorTerms) -}}
{{- $expressions := default list $term.matchExpressions -}}
{{- range $keep -}}{{- if not (has . $expressions) -}}{{- $expressions = append $expressions . -}}{{- end -}}{{- end -}}
{{- range $label := $serverLabels -}}
{{- $withLabel := $expressions -}}
{{- if not (has $label $withLabel) -}}{{- $withLabel = append $withLabel $label -}}{{- end -}}
{{- $terms = append $terms (set (deepCopy $term) "matchExpressions" $withLabel) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $required "nodeSelectorTerms" $terms -}}
{{- $_ := set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required -}}
{{- $_ := set $affinity "nodeAffinity" $nodeAffinity -}}
{{- toYaml $affinity -}}
{{- end -}}

{{/* The webhook's matchConditions expression (deploy/base/webhook.yaml explains it), naming the
server nodes' label keys and taint of these values. */}}
{{- define "imdsgate.webhookMatchExpression" -}}
{{- $taint := regexSplit ":" .Values.server.serverNodeTaint -1 -}}
{{- $taintKey := index (regexSplit "=" (index $taint 0) -1) 0 -}}
{{- $taintEffect := index $taint 1 -}}
{{- $keys := list -}}
{{- range $k, $_ := (include "imdsgate.serverNodeLabels" . | fromJson) -}}{{- $keys = append $keys (printf "'%s' in object.spec.nodeSelector" $k) -}}{{- end -}}
{{- $selector := printf "(has(object.spec.nodeSelector) && %s)" (join " || " $keys) -}}
{{- if gt (len $keys) 1 -}}{{- $selector = printf "(has(object.spec.nodeSelector) && (%s))" (join " || " $keys) -}}{{- end -}}
((has(request.subResource) && request.subResource == 'binding') || request.resource.resource == 'bindings')
? request.userInfo.username != 'system:kube-scheduler'
: (
    (has(object.metadata.annotations)
      && ('iam.amazonaws.com/role' in object.metadata.annotations
          || 'iam.amazonaws.com/session-name' in object.metadata.annotations))
    || (has(object.spec.hostNetwork) && object.spec.hostNetwork)
    || (has(object.spec.nodeName) && object.spec.nodeName != '')
    || {{ $selector }}
    || (has(object.spec.affinity) && has(object.spec.affinity.nodeAffinity)
        && has(object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution))
    || (has(object.spec.tolerations) && object.spec.tolerations.exists(t,
        (!has(t.effect) || t.effect == '' || t.effect == '{{ $taintEffect }}')
        && ((has(t.key) && t.key == '{{ $taintKey }}')
            || ((!has(t.key) || t.key == '') && has(t.operator) && t.operator == 'Exists'))))
  )
  && (oldObject == null
    || (has(object.metadata.annotations) && 'iam.amazonaws.com/role' in object.metadata.annotations ? object.metadata.annotations['iam.amazonaws.com/role'] : '')
       != (has(oldObject.metadata.annotations) && 'iam.amazonaws.com/role' in oldObject.metadata.annotations ? oldObject.metadata.annotations['iam.amazonaws.com/role'] : '')
    || (has(object.metadata.annotations) && 'iam.amazonaws.com/session-name' in object.metadata.annotations ? object.metadata.annotations['iam.amazonaws.com/session-name'] : '')
       != (has(oldObject.metadata.annotations) && 'iam.amazonaws.com/session-name' in oldObject.metadata.annotations ? oldObject.metadata.annotations['iam.amazonaws.com/session-name'] : '')
    || (has(object.spec.tolerations) ? size(object.spec.tolerations) : 0)
       != (has(oldObject.spec.tolerations) ? size(oldObject.spec.tolerations) : 0))
{{- end -}}
