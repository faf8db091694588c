// Command libcni drives a CNI network list through libcni, the library container runtimes
// link, so a test sees a plugin exactly as CRI-O, Podman or containerd's go-cni would run it.
//
//	libcni add|check|del|cached CONFLIST CONTAINERID NETNS IFNAME
//	libcni validate|version CONFLIST
//
// CONFLIST is a path to a .conflist file, or a network name looked up in NETCONFPATH.
// Plugins are found in the colon-separated CNI_PATH; libcni's result cache lives in
// CNI_CACHE_DIR. CNI_ARGS ("K=V;K=V") and CAP_ARGS (a JSON object) reach the plugins as
// args and runtimeConfig. A result (add, cached), the capabilities (validate) or each
// plugin's version info (version) is printed as JSON on stdout; check and del print
// nothing. An error goes to stderr (a plugin's as "error CODE: MSG") and the exit
// status is 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

// timeout bounds one command: a whole list, every plugin of it.
const timeout = 5 * time.Minute

func usage() error {
	return fmt.Errorf("usage: %s add|check|del|cached CONFLIST CONTAINERID NETNS IFNAME"+
		" | validate|version CONFLIST", filepath.Base(os.Args[0]))
}

// loadList reads a conflist from a path, or by network name from NETCONFPATH.
func loadList(ref string) (*libcni.NetworkConfigList, error) {
	if strings.ContainsRune(ref, os.PathSeparator) {
		return libcni.ConfListFromFile(ref)
	}
	dir := os.Getenv("NETCONFPATH")
	if dir == "" {
		return nil, fmt.Errorf("%q is no path and NETCONFPATH is not set", ref)
	}
	return libcni.LoadConfList(dir, ref)
}

// runtimeConf is what a runtime knows of the attachment: ids, netns, args, capabilities.
func runtimeConf(container, netns, ifname string) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{ContainerID: container, NetNS: netns, IfName: ifname}
	if raw := os.Getenv("CNI_ARGS"); raw != "" {
		for _, pair := range strings.Split(raw, ";") {
			key, value, ok := strings.Cut(pair, "=")
			if !ok {
				return nil, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", pair)
			}
			rt.Args = append(rt.Args, [2]string{key, value})
		}
	}
	if raw := os.Getenv("CAP_ARGS"); raw != "" {
		if err := json.Unmarshal([]byte(raw), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("CAP_ARGS: %w", err)
		}
	}
	return rt, nil
}

func printJSON(v interface{}) error {
	out, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(os.Stdout, string(out))
	return err
}

// versions asks every plugin of the list for its version info, keyed by plugin type.
func versions(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
	infos := map[string]interface{}{}
	for _, plugin := range list.Plugins {
		info, err := cni.GetVersionInfo(ctx, plugin.Network.Type)
		if err != nil {
			return fmt.Errorf("%s: %w", plugin.Network.Type, err)
		}
		infos[plugin.Network.Type] = map[string]interface{}{
			"supportedVersions": info.SupportedVersions(),
		}
	}
	return printJSON(infos)
}

func run(args []string) error {
	if len(args) < 2 {
		return usage()
	}
	command, ref := args[0], args[1]
	list, err := loadList(ref)
	if err != nil {
		return err
	}
	cni := libcni.NewCNIConfigWithCacheDir(
		filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	switch command {
	case "validate":
		caps, err := cni.ValidateNetworkList(ctx, list)
		if err != nil {
			return err
		}
		sort.Strings(caps)
		return printJSON(map[string]interface{}{"capabilities": caps})
	case "version":
		return versions(ctx, cni, list)
	}
	if len(args) != 5 {
		return usage()
	}
	rt, err := runtimeConf(args[2], args[3], args[4])
	if err != nil {
		return err
	}
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		return printJSON(result)
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return cni.DelNetworkList(ctx, list, rt)
	case "cached":
		// null when libcni has no result cached for this attachment
		result, err := cni.GetNetworkListCachedResult(list, rt)
		if err != nil {
			return err
		}
		return printJSON(result)
	}
	return usage()
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		// a plugin's error object: its code is part of the answer, not only its text
		var plugin *types.Error
		if errors.As(err, &plugin) {
			fmt.Fprintf(os.Stderr, "error %d: %v\n", plugin.Code, err)
		} else {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(1)
	}
}
