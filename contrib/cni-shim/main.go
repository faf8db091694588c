// Command qmpnet-cni (the compiled front) answers VERSION and forwards every other CNI command
// to qmpnetd's cni.exec, so that a runtime's call costs a socket round trip and not a Python
// interpreter's start-up. Where no service takes the call (no socket, nothing listening, a
// caller it refuses, stdin that is not UTF-8) it runs the full Python plugin with the same
// stdin and environment, as the Python front (qmpnet/cni/entry.py) does.
//
// It speaks the same protocol and answers alike; tests/test_cni_shim.py runs both fronts on
// the same inputs. Standard library only, so that it builds offline with Debian's golang-go.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"unicode/utf8"
)

// Kept equal to qmpnet.cni.versions and qmpnet.service.protocol by tests/test_cni_shim.py.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

const (
	readMax         = (1 << 20) + 1
	lineMax         = 8 << 20
	protocolVersion = 1
	defaultSocket   = "/run/qmpnet/qmpnetd.sock"
	tryAgain        = 11
)

// fullPlugin is the Python plugin run when no service takes the call; the build sets it
// (-ldflags "-X main.fullPlugin=/path/to/qmpnet-cni").
var fullPlugin = ""

// forwarded is the environment the service needs of an invocation (entry.FORWARDED).
var forwarded = []string{
	"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
	"QMPNET_CNI_DEBUG",
}

func latest() string { return supportedVersions[len(supportedVersions)-1] }

// asked is the configuration's cniVersion when this plugin speaks it, else the latest.
func asked(raw []byte) string {
	if utf8.Valid(raw) {
		var doc map[string]any
		if json.Unmarshal(raw, &doc) == nil {
			if v, ok := doc["cniVersion"].(string); ok {
				for _, s := range supportedVersions {
					if s == v {
						return v
					}
				}
			}
		}
	}
	return latest()
}

func readStdin() ([]byte, error) {
	return io.ReadAll(io.LimitReader(os.Stdin, readMax))
}

func answer(status int, out string) {
	if out != "" {
		os.Stdout.WriteString(out + "\n")
	}
	os.Exit(status)
}

func encode(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only maps of strings and numbers are encoded
	}
	return string(b)
}

func tryAgainError(raw []byte, msg string) string {
	return encode(map[string]any{"cniVersion": asked(raw), "code": tryAgain, "msg": msg})
}

// serviceSocket is the socket the configuration names ("qmpnetd"), "" for the direct mode or
// a configuration this cannot read (the full plugin reports what is wrong with it).
func serviceSocket(raw []byte) string {
	var doc map[string]any
	if json.Unmarshal(raw, &doc) != nil {
		return ""
	}
	got, present := doc["qmpnetd"]
	if !present {
		return defaultSocket
	}
	path, ok := got.(string)
	if !ok || !filepath.IsAbs(path) {
		return ""
	}
	return path
}

type rpcError struct {
	Code    int            `json:"code"`
	Message string         `json:"message"`
	Data    map[string]any `json:"data"`
}

type reply struct {
	Result *json.RawMessage `json:"result"`
	Error  *rpcError        `json:"error"`
}

type done struct {
	status        int
	stdout, stder string
}

// errUnavailable: no service takes this call; the full plugin does it.
var errUnavailable = errors.New("no service")

func forward(path string, raw []byte) (done, error) {
	if !utf8.Valid(raw) {
		return done{}, errUnavailable
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		return done{}, errUnavailable // not running (a stale socket), or not ours to open
	}
	defer conn.Close()
	environ := map[string]string{}
	for _, k := range forwarded {
		if v, ok := os.LookupEnv(k); ok {
			environ[k] = v
		}
	}
	request := map[string]any{
		"jsonrpc": "2.0",
		"method":  "cni.exec",
		"params": map[string]any{
			"protocol": protocolVersion, "environ": environ, "stdin": string(raw),
		},
		"id": 1,
	}
	if _, err := conn.Write([]byte(encode(request) + "\n")); err != nil {
		return lost(raw, path), nil
	}
	line, err := bufio.NewReader(io.LimitReader(conn, lineMax+1)).ReadBytes('\n')
	if err != nil { // no whole line: the service went away before it answered
		return lost(raw, path), nil
	}
	var got reply
	if err := json.Unmarshal(line, &got); err != nil {
		return failed(raw, fmt.Sprintf("qmpnetd at %s: unreadable reply: %v", path, err)), nil
	}
	if got.Error != nil {
		if refused, _ := got.Error.Data["refused_caller"].(bool); refused {
			return done{}, errUnavailable
		}
		return failed(raw, fmt.Sprintf("qmpnetd at %s: %s", path, got.Error.Message)), nil
	}
	var result map[string]any
	if got.Result == nil || json.Unmarshal(*got.Result, &result) != nil || result == nil {
		return failed(raw, fmt.Sprintf("qmpnetd at %s: an answer that is not an object", path)), nil
	}
	status := 1
	if n, ok := result["exit"].(float64); ok {
		status = int(n)
	}
	return done{status, text(result["stdout"]), text(result["stderr"])}, nil
}

func text(v any) string {
	switch s := v.(type) {
	case nil:
		return ""
	case string:
		return s
	default:
		return fmt.Sprint(s)
	}
}

func failed(raw []byte, msg string) done { return done{1, tryAgainError(raw, msg), ""} }

func lost(raw []byte, path string) done {
	return failed(raw, fmt.Sprintf(
		"qmpnetd at %s closed the connection before answering cni.exec (stopped or died): "+
			"the operation is complete, or rolled back when the service is back; "+
			"`qmpnet list-ifaces` tells which", path))
}

// full runs the Python plugin on the same stdin and environment and exits with its status.
func full(raw []byte, readErr error) {
	if fullPlugin == "" {
		answer(1, encode(map[string]any{
			"cniVersion": asked(raw), "code": 999,
			"msg": "this qmpnet-cni front was built without the path of the full plugin " +
				"(make cni-shim sets it), and no qmpnetd took the call",
		}))
	}
	if self, err := os.Executable(); err == nil && sameFile(self, fullPlugin) {
		answer(1, encode(map[string]any{
			"cniVersion": asked(raw), "code": 999,
			"msg": fmt.Sprintf("the full plugin %s is this front itself: build it with "+
				"QMPNET_CNI naming the Python console script", fullPlugin),
		}))
	}
	cmd := exec.Command(fullPlugin)
	if readErr == nil {
		cmd.Stdin = bytes.NewReader(raw)
	} else {
		cmd.Stdin = os.Stdin // it reads again and reports the error
	}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// a runtime that kills this front on its deadline kills the plugin it runs with it
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &exit):
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			os.Exit(128 + int(ws.Signal()))
		}
		os.Exit(exit.ExitCode())
	default:
		answer(1, encode(map[string]any{
			"cniVersion": asked(raw), "code": 999,
			"msg": fmt.Sprintf("cannot run the full plugin %s: %v", fullPlugin, err),
		}))
	}
}

func sameFile(a, b string) bool {
	sa, errA := os.Stat(a)
	sb, errB := os.Stat(b)
	return errA == nil && errB == nil && os.SameFile(sa, sb)
}

func main() {
	raw, err := readStdin()
	if os.Getenv("CNI_COMMAND") == "VERSION" {
		answer(0, encode(map[string]any{
			"cniVersion": asked(raw), "supportedVersions": supportedVersions,
		}))
	}
	if err == nil {
		if path := serviceSocket(raw); path != "" {
			if got, ferr := forward(path, raw); ferr == nil {
				if got.stder != "" {
					os.Stderr.WriteString(got.stder)
				}
				answer(got.status, got.stdout)
			}
		}
	}
	full(raw, err)
}
