// Command qmpnet (the compiled front) sends its command line to qmpnetd's cli.exec, so that a
// runtime's or an operator's call costs a socket round trip and not a Python interpreter's
// start-up. The service runs the command with the Python client's own code (qmpnet.cli.serve)
// and answers with its exit status, stdout and stderr; relative paths are this process's, and
// a file the command reads (the interface JSON, "-" for stdin, a config) is read here, with
// this process's rights, when the service asks for it.
//
// Where the service does not take the command line (no socket, nothing listening, a caller it
// refuses, an older service, help, a usage error, --version, --direct, demo) this runs the
// Python qmpnet it was built with (-X main.fullCli), with the same arguments and environment,
// in its place. tests/test_cli_shim.py runs both fronts on the same inputs. Standard library
// only, so that it builds offline with Debian's golang-go.
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"unicode/utf8"
)

// Kept equal to qmpnet.cli, qmpnet.service.protocol and qmpnet.service.cliexec by
// tests/test_cli_shim.py.
const (
	readMax          = (1 << 20) + 1
	lineMax          = 8 << 20
	protocolVersion  = 1
	defaultSocket    = "/run/qmpnet/qmpnetd.sock"
	filesMax         = 4
	exitService      = 10
	methodNotFound   = -32601
	protocolMismatch = -32001
)

// fullCli is the Python qmpnet run when the service does not take a command line; the build
// sets it (-ldflags "-X main.fullCli=/path/to/qmpnet").
var fullCli = ""

// globals that take a value (qmpnet.cli._GLOBAL_VALUED) and those that do not but leave the
// command line the service's to run
var (
	valued = []string{"--socket", "--state-root", "--log-format"}
	plain  = []string{"-v", "-vv", "-vvv", "--verbose", "--debug"}
)

func member(s string, set []string) bool {
	for _, x := range set {
		if s == x {
			return true
		}
	}
	return false
}

// socketOf is the service socket the command line names, or false when the line is not one
// to forward (--direct, --version, help, an option this does not know: the Python front
// parses those itself).
func socketOf(args []string) (string, bool) {
	socket := ""
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !utf8.ValidString(a) {
			return "", false // argv that JSON cannot carry as it is
		}
		switch {
		case !strings.HasPrefix(a, "-"):
			i = len(args) // the command: the rest is its own
		case member(a, valued):
			if i+1 >= len(args) {
				return "", false
			}
			if a == "--socket" {
				socket = args[i+1]
			}
			i++
		case strings.HasPrefix(a, "--socket="):
			socket = strings.TrimPrefix(a, "--socket=")
		case strings.HasPrefix(a, "--state-root="), strings.HasPrefix(a, "--log-format="):
		case member(a, plain):
		default:
			return "", false
		}
	}
	if socket == "" {
		socket = os.Getenv("QMPNET_SOCKET")
	}
	if socket == "" {
		socket = defaultSocket
	}
	return socket, true
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

type answer struct {
	Exit     *int     `json:"exit"`
	Stdout   string   `json:"stdout"`
	Stderr   string   `json:"stderr"`
	Read     []string `json:"read"`
	Fallback *string  `json:"fallback"`
}

// errFull: the service does not take this command line; the Python front runs it.
var errFull = errors.New("not forwarded")

// file is what the service is sent of one file the command reads: its bytes, or the errno
// reading it failed with (the service words it as Python would).
func file(path string) map[string]any {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return errnoOf(err)
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, readMax))
	if err != nil {
		return errnoOf(err)
	}
	return map[string]any{"data": base64.StdEncoding.EncodeToString(data)}
}

func errnoOf(err error) map[string]any {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = syscall.EIO
	}
	return map[string]any{"errno": int(errno)}
}

// dial connects a blocking unix socket: the net package's poller and its start-up (~1.5 ms
// of a process that sends two lines) buy nothing here.
func dial(path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

func forward(path string, args []string) (answer, error) {
	cwd, err := os.Getwd()
	if err != nil || !utf8.ValidString(cwd) {
		return answer{}, errFull
	}
	conn, err := dial(path)
	if err != nil {
		return answer{}, errFull // not running (a stale socket), or not ours to open
	}
	defer conn.Close()
	lines := bufio.NewReaderSize(io.LimitReader(conn, 4*lineMax), 1<<16)
	files := map[string]any{}
	for id := 1; id <= filesMax+1; id++ {
		request := map[string]any{
			"jsonrpc": "2.0",
			"method":  "cli.exec",
			"params": map[string]any{
				"protocol": protocolVersion, "argv": args, "cwd": cwd, "files": files,
			},
			"id": id,
		}
		body, err := json.Marshal(request)
		if err != nil {
			return answer{}, errFull
		}
		if _, err := conn.Write(append(body, '\n')); err != nil {
			return lost(path), nil
		}
		line, err := lines.ReadBytes('\n')
		if err != nil || len(line) > lineMax { // no whole line: the service went away
			return lost(path), nil
		}
		var got reply
		if json.Unmarshal(line, &got) != nil {
			return failed(exitService, fmt.Sprintf("qmpnetd at %s: an unreadable reply", path)), nil
		}
		if got.Error != nil {
			if notTaken(got.Error) {
				// a caller it refuses, an older service without cli.exec or protocol:
				// nothing was done, and the Python front says what there is to say
				return answer{}, errFull
			}
			status := 1
			if n, ok := got.Error.Data["exit"].(float64); ok {
				status = int(n)
			}
			return failed(status, got.Error.Message), nil
		}
		var a answer
		if got.Result == nil || json.Unmarshal(*got.Result, &a) != nil {
			return failed(exitService, fmt.Sprintf("qmpnetd at %s: an answer that is not "+
				"cli.exec's", path)), nil
		}
		if a.Fallback != nil {
			return answer{}, errFull // decided before anything was done or read
		}
		if len(a.Read) == 0 {
			if a.Exit == nil {
				return failed(exitService, fmt.Sprintf("qmpnetd at %s: an answer without "+
					"an exit status", path)), nil
			}
			return a, nil
		}
		for _, p := range a.Read {
			if _, done := files[p]; done || !utf8.ValidString(p) {
				return answer{}, errFull
			}
			files[p] = file(p)
		}
	}
	return answer{}, errFull
}

// notTaken: errors the service gives before it runs anything of a command line, for which
// the Python front is the one to answer. Any other error may come after the service acted:
// it is said, never run again.
func notTaken(e *rpcError) bool {
	refused, _ := e.Data["refused_caller"].(bool)
	return refused || e.Code == methodNotFound || e.Code == protocolMismatch
}

func failed(status int, msg string) answer {
	return answer{Exit: &status, Stderr: "qmpnet: error: " + msg + "\n"}
}

func lost(path string) answer {
	status := exitService
	return answer{Exit: &status, Stderr: fmt.Sprintf(
		"qmpnet: error: qmpnetd at %s closed the connection before answering cli.exec "+
			"(stopped or died): the operation is complete, or rolled back when the service "+
			"is back; `qmpnet list-ifaces` tells which\n", path)}
}

// full runs the Python front in this process's place, with the same arguments.
func full(args []string) {
	fail := func(msg string) {
		os.Stderr.WriteString("qmpnet: error: " + msg + "\n")
		os.Exit(1)
	}
	if fullCli == "" {
		fail("this qmpnet front was built without the path of the Python qmpnet " +
			"(make cli-shim sets it), and qmpnetd did not take the command")
	}
	self, err := os.Executable()
	if err == nil {
		sa, errA := os.Stat(self)
		sb, errB := os.Stat(fullCli)
		if errA == nil && errB == nil && os.SameFile(sa, sb) {
			fail(fmt.Sprintf("the Python qmpnet %s is this front itself: build it with "+
				"QMPNET naming the Python console script", fullCli))
		}
	}
	err = syscall.Exec(fullCli, append([]string{fullCli}, args...), os.Environ())
	fail(fmt.Sprintf("cannot run the Python qmpnet %s: %v", fullCli, err))
}

func main() {
	args := os.Args[1:]
	if path, ok := socketOf(args); ok {
		if a, err := forward(path, args); err == nil {
			os.Stdout.WriteString(a.Stdout)
			os.Stderr.WriteString(a.Stderr)
			os.Exit(*a.Exit)
		}
	}
	full(args)
}
