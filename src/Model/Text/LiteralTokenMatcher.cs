namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>
/// Finds the longest token text (from a fixed set) starting at a position, with a character trie. Used to cut text at
/// added/user-defined tokens such as <c>&lt;image&gt;</c>, <c>&lt;bos&gt;</c> and <c>&lt;loc0042&gt;</c> before BPE.
/// </summary>
internal sealed class LiteralTokenMatcher
{
    private const int NoToken = -1;

    private readonly List<Dictionary<char, int>?> _children = [null];
    private readonly List<int> _tokenIds = [NoToken];

    /// <summary>Adds <paramref name="text"/>; when the same text is added twice the first id is kept.</summary>
    public void Add(string text, int id)
    {
        int node = 0;
        foreach (char c in text)
        {
            Dictionary<char, int> children = _children[node] ??= [];
            if (!children.TryGetValue(c, out int child))
            {
                child = _children.Count;
                _children.Add(null);
                _tokenIds.Add(NoToken);
                children.Add(c, child);
            }

            node = child;
        }

        if (_tokenIds[node] == NoToken)
        {
            _tokenIds[node] = id;
        }
    }

    /// <summary>Longest token that is a prefix of <paramref name="text"/>.</summary>
    public bool TryMatch(ReadOnlySpan<char> text, out int length, out int id)
    {
        length = 0;
        id = NoToken;
        int node = 0;
        for (int i = 0; i < text.Length; i++)
        {
            Dictionary<char, int>? children = _children[node];
            if (children is null || !children.TryGetValue(text[i], out node))
            {
                break;
            }

            if (_tokenIds[node] != NoToken)
            {
                length = i + 1;
                id = _tokenIds[node];
            }
        }

        return length > 0;
    }
}
