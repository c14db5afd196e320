// flux-ssa applies a directory of manifests the way Flux's kustomize-controller does, with the
// same library (github.com/fluxcd/pkg/ssa): ResourceManager.ApplyAllStaged, then DeleteAll of
// the objects that left the set (pruning against the previous inventory, which the controller
// keeps in the Kustomization's status and this program keeps in a file), then WaitForSet
// (kstatus) until every object is Current. It prints one JSON line of results.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/fluxcd/cli-utils/pkg/kstatus/polling"
	"github.com/fluxcd/cli-utils/pkg/object"
	"github.com/fluxcd/pkg/ssa"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"tether.local/bench/engines/common"
)

// Set at build time (-X main.version=...).
var version = "unknown"

const (
	// kustomize-controller's `--concurrent-ssa` default.
	defaultConcurrency = 4
	// The benchmark's wait interval (kustomize-controller's health checks poll every 5 s;
	// a shorter interval only helps this engine's time to all Current).
	waitInterval = 500 * time.Millisecond
	timeout      = 30 * time.Minute
	group        = "kustomize.toolkit.fluxcd.io"
)

func main() {
	a := common.ParseArgs(defaultConcurrency)
	r, err := run(a, a.Inventory)
	if err != nil {
		common.Fail("flux-ssa", err)
	}
	if err := common.Print(r); err != nil {
		common.Fail("flux-ssa", err)
	}
}

func newManager(kubeconfig string, concurrency int) (*ssa.ResourceManager, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	// No client-side rate limit (a negative QPS turns client-go's limiter off).
	cfg.QPS = -1
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		return nil, err
	}
	poller := polling.NewStatusPoller(c, c.RESTMapper(), polling.Options{})
	m := ssa.NewResourceManager(c, poller, ssa.Owner{Field: "kustomize-controller", Group: group})
	m.SetConcurrency(concurrency)
	return m, nil
}

// applyOptions are kustomize-controller's (no force, its exclusion and force selectors).
func applyOptions() ssa.ApplyOptions {
	o := ssa.DefaultApplyOptions()
	o.ExclusionSelector = map[string]string{group + "/reconcile": "disabled", group + "/ssa": "Ignore"}
	o.IfNotPresentSelector = map[string]string{group + "/ssa": "IfNotPresent"}
	o.ForceSelector = map[string]string{group + "/force": "enabled"}
	return o
}

func run(a common.Args, inventoryFile string) (common.Result, error) {
	r := common.Result{Engine: "flux-ssa", Version: version, Concurrency: a.Concurrency}
	m, err := newManager(a.Kubeconfig, a.Concurrency)
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
	m.SetOwnerLabels(objs, a.Name, a.Namespace)
	ctx := context.Background()
	cs, err := m.ApplyAllStaged(ctx, objs, applyOptions())
	if err != nil {
		return r, fmt.Errorf("apply: %w", err)
	}
	for _, e := range cs.Entries {
		if e.Action == ssa.UnchangedAction {
			r.Unchanged++
		} else {
			r.Applied++
		}
	}
	r.ApplySeconds = common.Since(start)
	applied := object.UnstructuredSetToObjMetadataSet(objs)
	if err := prune(ctx, m, inventoryFile, applied, a, &r); err != nil {
		return r, err
	}
	r.PruneSeconds = common.Since(start) - r.ApplySeconds
	wait := ssa.WaitOptions{Interval: waitInterval, Timeout: timeout}
	if err := m.WaitForSet(applied, wait); err != nil {
		return r, fmt.Errorf("wait: %w", err)
	}
	r.TotalSeconds = common.Since(start)
	r.WaitSeconds = r.TotalSeconds - r.ApplySeconds - r.PruneSeconds
	return r, saveInventory(inventoryFile, objs)
}

// prune deletes what the previous inventory had and the new set lacks, as kustomize-controller
// does with `prune: true` (background propagation, only objects carrying its owner labels).
func prune(ctx context.Context, m *ssa.ResourceManager, file string, applied object.ObjMetadataSet, a common.Args, r *common.Result) error {
	previous, ids, err := loadInventory(file)
	if err != nil {
		return err
	}
	var stale []*unstructured.Unstructured
	for i, id := range ids {
		if !applied.Contains(id) {
			stale = append(stale, previous[i])
		}
	}
	if len(stale) == 0 {
		return nil
	}
	opts := ssa.DeleteOptions{
		PropagationPolicy: metav1.DeletePropagationBackground,
		Inclusions:        m.GetOwnerLabels(a.Name, a.Namespace),
	}
	cs, err := m.DeleteAll(ctx, stale, opts)
	if err != nil {
		return fmt.Errorf("prune: %w", err)
	}
	r.Pruned = len(cs.Entries)
	return nil
}

// entry is one object of the inventory, as kustomize-controller's status.inventory keeps it:
// the object's id and its API version (needed to delete it).
type entry struct {
	ID      string `json:"id"`
	Version string `json:"v"`
}

func loadInventory(file string) ([]*unstructured.Unstructured, object.ObjMetadataSet, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	} else if err != nil {
		return nil, nil, err
	}
	var entries []entry
	if err := json.Unmarshal(b, &entries); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", file, err)
	}
	objs := make([]*unstructured.Unstructured, 0, len(entries))
	set := make(object.ObjMetadataSet, 0, len(entries))
	for _, e := range entries {
		id, err := object.ParseObjMetadata(e.ID)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		u := &unstructured.Unstructured{}
		u.SetGroupVersionKind(id.GroupKind.WithVersion(e.Version))
		u.SetNamespace(id.Namespace)
		u.SetName(id.Name)
		objs = append(objs, u)
		set = append(set, id)
	}
	return objs, set, nil
}

func saveInventory(file string, objs []*unstructured.Unstructured) error {
	entries := make([]entry, 0, len(objs))
	for _, o := range objs {
		id := object.UnstructuredToObjMetadata(o)
		entries = append(entries, entry{ID: id.String(), Version: o.GroupVersionKind().Version})
	}
	b, err := json.Marshal(entries)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
