// Command kubecheck validates Kubernetes manifests the way kube-apiserver does on create,
// without a cluster: each YAML document is decoded strictly (unknown and duplicate fields
// are errors) into its versioned type, defaulted, converted to the internal type and run
// through the resource's own registry strategy (rest.BeforeCreate: PrepareForCreate,
// Validate, the declarative validation, WarningsOnCreate), the code the API server runs.
//
// Pod templates are also held to a Pod Security Standards level (the Pod Security
// admission's own checks; -pod-security, "restricted" unless told otherwise).
//
//	kubecheck FILE...          one line per object; exit 1 on any error
//	kubecheck -dump FILE...    also print the defaulted objects, as a JSON list, on stdout
//
// What it cannot see: the other admission steps (quota, LimitRange, webhooks), objects that
// must exist (Secrets, ConfigMaps, namespaces), and kinds it does not know.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/warning"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	_ "k8s.io/kubernetes/pkg/apis/apps/install"
	"k8s.io/kubernetes/pkg/apis/core"
	_ "k8s.io/kubernetes/pkg/apis/core/install"
	_ "k8s.io/kubernetes/pkg/apis/networking/install"
	_ "k8s.io/kubernetes/pkg/apis/policy/install"
	"k8s.io/kubernetes/pkg/registry/apps/deployment"
	"k8s.io/kubernetes/pkg/registry/apps/statefulset"
	"k8s.io/kubernetes/pkg/registry/core/configmap"
	"k8s.io/kubernetes/pkg/registry/core/secret"
	"k8s.io/kubernetes/pkg/registry/core/service"
	"k8s.io/kubernetes/pkg/registry/core/serviceaccount"
	"k8s.io/kubernetes/pkg/registry/networking/networkpolicy"
	"k8s.io/kubernetes/pkg/registry/policy/poddisruptionbudget"
	psaapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

var strategies = map[schema.GroupKind]rest.RESTCreateStrategy{
	{Group: "apps", Kind: "Deployment"}:                 deployment.Strategy,
	{Group: "apps", Kind: "StatefulSet"}:                statefulset.Strategy,
	{Group: "", Kind: "Service"}:                        service.Strategy,
	{Group: "", Kind: "Secret"}:                         secret.Strategy,
	{Group: "", Kind: "ConfigMap"}:                      configmap.Strategy,
	{Group: "", Kind: "ServiceAccount"}:                 serviceaccount.Strategy,
	{Group: "policy", Kind: "PodDisruptionBudget"}:      poddisruptionbudget.Strategy,
	{Group: "networking.k8s.io", Kind: "NetworkPolicy"}: networkpolicy.Strategy,
}

type warnings struct{ list []string }

func (w *warnings) AddWarning(_, text string) { w.list = append(w.list, text) }

func main() {
	dump := flag.Bool("dump", false, "print the defaulted objects as a JSON list on stdout")
	level := flag.String("pod-security", "restricted", "Pod Security Standards level of pod templates")
	flag.Parse()
	var err error
	if podLevel, err = psaapi.ParseLevel(*level); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: kubecheck [-dump] FILE...")
		os.Exit(2)
	}
	scheme := legacyscheme.Scheme
	decoder := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	var objects []runtime.Object
	failed := false
	for _, path := range flag.Args() {
		docs, err := documents(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		for i, doc := range docs {
			where := fmt.Sprintf("%s#%d", path, i+1)
			obj, problems := check(scheme, decoder, doc)
			for _, w := range problems.warnings {
				fmt.Fprintf(os.Stderr, "%s: warning: %s\n", where, w)
			}
			if problems.err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", where, problems.err)
				failed = true
				continue
			}
			fmt.Fprintf(os.Stderr, "%s: ok %s\n", where, problems.name)
			objects = append(objects, obj)
		}
	}
	if *dump {
		out, err := json.Marshal(objects)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Stdout.Write(append(out, '\n'))
	}
	if failed {
		os.Exit(1)
	}
}

// documents splits a YAML file into its non-empty documents.
func documents(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	reader := utilyaml.NewYAMLReader(bufioReader(f))
	var docs [][]byte
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(stripComments(doc))) > 0 {
			docs = append(docs, doc)
		}
	}
}

type result struct {
	name     string
	warnings []string
	err      error
}

// check decodes one document strictly, defaults it and runs its create strategy; it
// returns the defaulted versioned object.
func check(scheme *runtime.Scheme, decoder runtime.Decoder, doc []byte) (runtime.Object, result) {
	obj, gvk, err := decoder.Decode(doc, nil, nil)
	if err != nil {
		// Strict decoding errors (unknown or duplicate fields) land here too.
		return nil, result{err: err}
	}
	name := gvk.Kind
	strategy, known := strategies[gvk.GroupKind()]
	if !known {
		return nil, result{name: name, err: fmt.Errorf("kind %s is not checked by kubecheck", gvk)}
	}
	scheme.Default(obj)
	internal, err := scheme.ConvertToVersion(obj.DeepCopyObject(), schema.GroupVersion{Group: gvk.Group, Version: runtime.APIVersionInternal})
	if err != nil {
		return nil, result{name: name, err: err}
	}
	accessor, err := metaAccessor(internal)
	if err != nil {
		return nil, result{name: name, err: err}
	}
	name = gvk.Kind + "/" + accessor
	namespace := "default"
	if ns := namespaceOf(internal); ns != "" {
		namespace = ns
	}
	sink := &warnings{}
	ctx := warning.WithWarningRecorder(context.Background(), sink)
	ctx = genericapirequest.WithNamespace(ctx, namespace)
	ctx = genericapirequest.WithRequestInfo(ctx, &genericapirequest.RequestInfo{
		IsResourceRequest: true, Verb: "create", APIGroup: gvk.Group, APIVersion: gvk.Version,
		Namespace: namespace, Name: accessor,
	})
	// The API server's create handler sets the UID and creation time before BeforeCreate.
	if m, err := meta.Accessor(internal); err == nil {
		rest.FillObjectMetaSystemFields(m)
	}
	if svc, ok := internal.(*core.Service); ok {
		allocateService(svc)
	}
	if err := rest.BeforeCreate(strategy, ctx, internal); err != nil {
		return nil, result{name: name, warnings: sink.list, err: err}
	}
	if violations := podSecurity(obj); violations != "" {
		return nil, result{name: name, warnings: sink.list, err: fmt.Errorf(
			"pod template violates PodSecurity %q: %s", podLevel, violations)}
	}
	return obj, result{name: name, warnings: sink.list}
}

var podLevel psaapi.Level

// podSecurity evaluates a workload's pod template as the Pod Security admission evaluates a
// pod at the level chosen, at the latest policy version; "" when it complies.
func podSecurity(obj runtime.Object) string {
	var template *corev1.PodTemplateSpec
	switch o := obj.(type) {
	case *appsv1.Deployment:
		template = &o.Spec.Template
	case *appsv1.StatefulSet:
		template = &o.Spec.Template
	default:
		return ""
	}
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		return err.Error()
	}
	results := evaluator.EvaluatePod(psaapi.LevelVersion{Level: podLevel, Version: psaapi.LatestVersion()},
		&template.ObjectMeta, &template.Spec)
	if aggregate := policy.AggregateCheckResults(results); !aggregate.Allowed {
		return aggregate.ForbiddenDetail()
	}
	return ""
}
