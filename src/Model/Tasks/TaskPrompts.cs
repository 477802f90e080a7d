namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>The tasks PaliGemma was trained on, named by the first word of their prompt.</summary>
public enum PaliGemmaTask
{
    /// <summary>A prompt that is none of the tasks below; its output is returned as text.</summary>
    Raw,
    Caption,
    Answer,
    Detect,
    Segment,
    Ocr,
}

/// <summary>
/// Builds prompts in PaliGemma's task syntax: <c>caption en</c>, <c>answer en what is this?</c>, <c>detect cat ; dog</c>,
/// <c>segment cat</c>, <c>ocr</c>. Inputs are validated so a bad label fails here instead of silently changing the task.
/// </summary>
public static class TaskPrompts
{
    public const string DefaultLanguage = "en";

    /// <summary>Separator between object names in detect/segment prompts, and between objects in the model's output.</summary>
    public const string ObjectSeparator = " ; ";

    public static string Caption(string language = DefaultLanguage) => $"caption {CheckLanguage(language)}";

    public static string Answer(string question, string language = DefaultLanguage)
    {
        CheckText(question, nameof(question), "question");
        return $"answer {CheckLanguage(language)} {question.Trim()}";
    }

    public static string Detect(IReadOnlyList<string> objects) => "detect " + JoinObjects(objects, nameof(objects));

    /// <summary><paramref name="objects"/> is one name or several separated by ';' ("cat ; dog").</summary>
    public static string Detect(string objects) => Detect(SplitObjects(objects));

    public static string Segment(IReadOnlyList<string> objects) => "segment " + JoinObjects(objects, nameof(objects));

    /// <inheritdoc cref="Detect(string)"/>
    public static string Segment(string objects) => Segment(SplitObjects(objects));

    public static string Ocr() => "ocr";

    /// <summary>Splits "cat ; dog" into trimmed names; an empty name (e.g. "cat ;; dog") is an error.</summary>
    /// <exception cref="ArgumentException">The text is empty, holds a newline, or an empty name.</exception>
    public static IReadOnlyList<string> SplitObjects(string objects)
    {
        ArgumentNullException.ThrowIfNull(objects);
        var names = objects.Split(';');
        for (int i = 0; i < names.Length; i++) names[i] = names[i].Trim();
        foreach (var name in names) CheckLabel(name, nameof(objects));
        return names;
    }

    /// <summary>The task a prompt asks for, from its first word (<see cref="PaliGemmaTask.Raw"/> when it is none of them).</summary>
    public static PaliGemmaTask TaskOf(string prompt)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var span = prompt.AsSpan().TrimStart();
        int end = span.IndexOfAny(' ', '\t', '\n');
        var first = end < 0 ? span : span[..end];
        return first switch
        {
            "caption" => PaliGemmaTask.Caption,
            "answer" => PaliGemmaTask.Answer,
            "detect" => PaliGemmaTask.Detect,
            "segment" => PaliGemmaTask.Segment,
            "ocr" => PaliGemmaTask.Ocr,
            _ => PaliGemmaTask.Raw,
        };
    }

    private static string JoinObjects(IReadOnlyList<string> objects, string paramName)
    {
        ArgumentNullException.ThrowIfNull(objects, paramName);
        if (objects.Count == 0) throw new ArgumentException("at least one object name is needed", paramName);
        var trimmed = new string[objects.Count];
        for (int i = 0; i < trimmed.Length; i++)
        {
            string name = objects[i]?.Trim() ?? "";
            CheckLabel(name, paramName);
            if (name.Contains(';')) throw new ArgumentException($"object name '{name}' contains ';', which separates objects", paramName);
            trimmed[i] = name;
        }
        return string.Join(ObjectSeparator, trimmed);
    }

    private static void CheckLabel(string name, string paramName)
    {
        if (name.Length == 0) throw new ArgumentException("an object name is empty (names are separated by ';')", paramName);
        CheckText(name, paramName, "object name");
        if (name.AsSpan().IndexOfAny('<', '>') >= 0)
            throw new ArgumentException($"object name '{name}' contains '<' or '>', which the output format reserves for location tokens", paramName);
    }

    private static void CheckText(string text, string paramName, string what)
    {
        ArgumentNullException.ThrowIfNull(text, paramName);
        if (string.IsNullOrWhiteSpace(text)) throw new ArgumentException($"the {what} is empty", paramName);
        if (text.AsSpan().IndexOfAny('\n', '\r') >= 0) throw new ArgumentException($"the {what} contains a newline, which ends a PaliGemma prompt", paramName);
    }

    private static string CheckLanguage(string language)
    {
        ArgumentNullException.ThrowIfNull(language);
        if (language.Length == 0 || language.Length > 16 || language.AsSpan().ContainsAny(" \t\r\n;<>"))
            throw new ArgumentException($"language must be a short code such as 'en' or 'de', got '{language}'", nameof(language));
        return language;
    }
}
