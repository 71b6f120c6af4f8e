// Stand-in for Lix's lix/libcmd/markdown.cc without lowdown (not packaged by Debian),
// for scripts/build-lix-tarball.sh: help text is shown as its Markdown source.
#include "lix/libcmd/markdown.hh"

namespace nix {

std::string renderMarkdownToTerminal(std::string_view markdown, StandardOutputStream fileno)
{
    (void) fileno;
    return std::string(markdown);
}

}
