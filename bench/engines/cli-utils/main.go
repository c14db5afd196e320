// cli-utils applies a directory of manifests the way GitLab's agentk did before its GitOps
// module was removed, with the same library (sigs.k8s.io/cli-utils): the applier with an
// inventory ConfigMap (server-side apply, force conflicts, prune with background propagation,
// inventory policy must-match) and its status watcher waiting for every object to be Current.
// The applier has no concurrency setting: it sends one request at a time. It prints one JSON
// line of results.
package main

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/rest"
	cmdutil "k8s.io/kubectl/pkg/cmd/util"
	"sigs.k8s.io/cli-utils/pkg/apply"
	"sigs.k8s.io/cli-utils/pkg/apply/event"
	clicommon "sigs.k8s.io/cli-utils/pkg/common"
	"sigs.k8s.io/cli-utils/pkg/inventory"

	"tether.local/bench/engines/common"
)

// Set at build time (-X main.version=...).
var version = "unknown"

const timeout = 30 * time.Minute

func main() {
	a := common.ParseArgs(1)
	r, err := run(a)
	if err != nil {
		common.Fail("cli-utils", err)
	}
	if err := common.Print(r); err != nil {
		common.Fail("cli-utils", err)
	}
}

func newApplier(kubeconfig string) (*apply.Applier, error) {
	flags := genericclioptions.NewConfigFlags(true)
	flags.KubeConfig = &kubeconfig
	// No client-side rate limit (a negative QPS turns client-go's limiter off).
	flags.WrapConfigFn = func(c *rest.Config) *rest.Config {
		c.QPS = -1
		return c
	}
	f := cmdutil.NewFactory(flags)
	inv, err := inventory.NewClient(f, inventory.WrapInventoryObj, inventory.InvInfoToConfigMap,
		inventory.StatusPolicyAll, inventory.ConfigMapGVK)
	if err != nil {
		return nil, err
	}
	return apply.NewApplierBuilder().WithFactory(f).WithInventoryClient(inv).Build()
}

// inventoryInfo is the inventory ConfigMap `inventory-NAME` in the namespace.
func inventoryInfo(name, namespace string) inventory.Info {
	cm := &unstructured.Unstructured{}
	cm.SetAPIVersion("v1")
	cm.SetKind("ConfigMap")
	cm.SetName("inventory-" + name)
	cm.SetNamespace(namespace)
	cm.SetLabels(map[string]string{clicommon.InventoryLabel: name})
	return inventory.WrapInventoryInfoObj(cm)
}

// options are GitLab's defaults for its cli-utils-based GitOps, with background propagation.
func options() apply.ApplierOptions {
	return apply.ApplierOptions{
		ServerSideOptions: clicommon.ServerSideOptions{
			ServerSideApply: true, ForceConflicts: true, FieldManager: "cli-utils-bench",
		},
		ReconcileTimeout:       timeout,
		EmitStatusEvents:       true,
		PrunePropagationPolicy: metav1.DeletePropagationBackground,
		PruneTimeout:           timeout,
		InventoryPolicy:        inventory.PolicyMustMatch,
	}
}

func run(a common.Args) (common.Result, error) {
	r := common.Result{Engine: "cli-utils", Version: version, Concurrency: 1}
	applier, err := newApplier(a.Kubeconfig)
	if err != nil {
		return r, err
	}
	start := time.Now()
	r.StartedUnixSec = float64(start.UnixNano()) / 1e9
	objs, err := common.ReadObjects(a.Dir, a.Namespace)
	if err != nil {
		return r, err
	}
	r.Objects = len(objs)
	events := applier.Run(context.Background(), inventoryInfo(a.Name, a.Namespace), objs, options())
	if err := collect(events, &r); err != nil {
		return r, err
	}
	r.TotalSeconds = common.Since(start)
	return r, nil
}

// collect reads the applier's events to the end: phase durations from the task groups'
// Started/Finished (a wait after a prune counts as prune), counts, and the first error.
func collect(events <-chan event.Event, r *common.Result) error {
	var firstErr error
	fail := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	started := map[string]time.Time{}
	pruned := false
	for e := range events {
		switch e.Type {
		case event.ErrorType:
			fail(e.ErrorEvent.Err)
		case event.ApplyType:
			if e.ApplyEvent.Error != nil {
				fail(fmt.Errorf("apply %v: %w", e.ApplyEvent.Identifier, e.ApplyEvent.Error))
			} else if e.ApplyEvent.Status == event.ApplySuccessful {
				r.Applied++
			}
		case event.PruneType:
			if e.PruneEvent.Error != nil {
				fail(fmt.Errorf("prune %v: %w", e.PruneEvent.Identifier, e.PruneEvent.Error))
			} else if e.PruneEvent.Status == event.PruneSuccessful {
				r.Pruned++
			}
		case event.WaitType:
			if s := e.WaitEvent.Status; s == event.ReconcileTimeout || s == event.ReconcileFailed {
				fail(fmt.Errorf("wait %v: %v", e.WaitEvent.Identifier, s))
			}
		case event.ActionGroupType:
			g := e.ActionGroupEvent
			if g.Status == event.Started {
				started[g.GroupName] = time.Now()
				continue
			}
			d := time.Since(started[g.GroupName]).Seconds()
			switch {
			case g.Action == event.ApplyAction:
				r.ApplySeconds += d
			case g.Action == event.PruneAction:
				r.PruneSeconds += d
				pruned = true
			case g.Action == event.WaitAction && pruned:
				r.PruneSeconds += d
			case g.Action == event.WaitAction:
				r.WaitSeconds += d
			}
		}
	}
	return firstErr
}
