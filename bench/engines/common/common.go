// Package common holds what both engine programs of the benchmark share: the command line,
// reading the manifest files agentk gets, and the one JSON line of results.
package common

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
)

// Args is the command line both programs take.
type Args struct {
	Kubeconfig  string
	Dir         string
	Namespace   string
	Concurrency int
	Name        string
	Inventory   string
}

// ParseArgs reads the flags; a missing one ends the program with its usage.
func ParseArgs(defaultConcurrency int) Args {
	var a Args
	flag.StringVar(&a.Kubeconfig, "kubeconfig", "", "kubeconfig of the ServiceAccount to apply as")
	flag.StringVar(&a.Dir, "dir", "", "directory of multi-document YAML files (*.yaml, recursively); an empty or missing one prunes everything")
	flag.StringVar(&a.Namespace, "namespace", "", "namespace for objects without one")
	flag.IntVar(&a.Concurrency, "concurrency", defaultConcurrency, "concurrent apply requests (where the engine has such a setting)")
	flag.StringVar(&a.Name, "name", "bench", "name of the inventory / owner")
	flag.StringVar(&a.Inventory, "inventory", "inventory.json",
		"file keeping the applied set between runs, for engines whose real user keeps it outside the cluster (Flux: the Kustomization's status.inventory); others ignore it")
	flag.Parse()
	if a.Kubeconfig == "" || a.Namespace == "" {
		flag.Usage()
		os.Exit(2)
	}
	return a
}

// ReadObjects decodes every document of the *.yaml files under dir, in path order, and gives
// each object without a namespace the default one (every object of the benchmark is
// namespaced, as agentk's default_namespace assumes too).
func ReadObjects(dir, namespace string) ([]*unstructured.Unstructured, error) {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) && p == dir {
				return filepath.SkipAll
			}
			return err
		}
		if !d.IsDir() && filepath.Ext(p) == ".yaml" {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	var objs []*unstructured.Unstructured
	for _, f := range files {
		fileObjs, err := readFile(f, namespace)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		objs = append(objs, fileObjs...)
	}
	return objs, nil
}

func readFile(path, namespace string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := yaml.NewYAMLOrJSONDecoder(f, 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err == io.EOF {
			return objs, nil
		} else if err != nil {
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		o := &unstructured.Unstructured{Object: m}
		if o.GetNamespace() == "" {
			o.SetNamespace(namespace)
		}
		objs = append(objs, o)
	}
}

// Result is the one JSON line a program prints: phases in seconds, counts, and its own CPU
// time and peak RSS (getrusage of the process, read just before it exits).
type Result struct {
	Engine         string  `json:"engine"`
	Version        string  `json:"version"`
	Concurrency    int     `json:"concurrency"`
	Objects        int     `json:"objects"`
	ApplySeconds   float64 `json:"apply_seconds"`
	PruneSeconds   float64 `json:"prune_seconds"`
	WaitSeconds    float64 `json:"wait_seconds"`
	TotalSeconds   float64 `json:"total_seconds"`
	Applied        int     `json:"applied"`
	Unchanged      int     `json:"unchanged"`
	Pruned         int     `json:"pruned"`
	CPUSeconds     float64 `json:"cpu_seconds"`
	PeakRSSBytes   int64   `json:"peak_rss_bytes"`
	StartedUnixSec float64 `json:"started_unix_seconds"`
}

// Print fills in the process's resource usage and writes r as one JSON line on stdout.
func Print(r Result) error {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return err
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	r.CPUSeconds = tv(ru.Utime) + tv(ru.Stime)
	r.PeakRSSBytes = ru.Maxrss * 1024 // Linux reports kilobytes.
	line, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(line))
	return err
}

// Since is the seconds from t to now.
func Since(t time.Time) float64 { return time.Since(t).Seconds() }

// Fail prints err on stderr and exits 1.
func Fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}
