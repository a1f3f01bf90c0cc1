// compose-check loads a Compose file the way `docker compose config` does (compose-go:
// schema, interpolation, normalization, consistency checks such as depends_on on a
// service that does not exist) without a Docker engine, and prints the resolved model.
//
//	compose-check [-profile NAME]... FILE...
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var profiles list
	flag.Var(&profiles, "profile", "profile to enable (repeatable; '*' enables all)")
	flag.Parse()
	opts, err := cli.NewProjectOptions(flag.Args(),
		cli.WithOsEnv, cli.WithDotEnv, cli.WithProfiles(profiles), cli.WithConsistency(true))
	if err == nil {
		project, lerr := opts.LoadProject(context.Background())
		if err = lerr; err == nil {
			out, merr := project.MarshalYAML()
			if err = merr; err == nil {
				os.Stdout.Write(out)
				return
			}
		}
	}
	fmt.Fprintln(os.Stderr, "compose-check:", err)
	os.Exit(1)
}
