using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.CpuOnly.Tests.Tasks;

public sealed class TaskPromptsTests
{
    [Fact]
    public void Prompts_follow_the_PaliGemma_syntax()
    {
        Assert.Equal("caption en", TaskPrompts.Caption());
        Assert.Equal("caption de", TaskPrompts.Caption("de"));
        Assert.Equal("answer en what is this?", TaskPrompts.Answer("what is this?"));
        Assert.Equal("answer fr qui est-ce ?", TaskPrompts.Answer("  qui est-ce ? ", "fr"));
        Assert.Equal("detect cat", TaskPrompts.Detect("cat"));
        Assert.Equal("detect cat ; red car", TaskPrompts.Detect(" cat ;red car "));
        Assert.Equal("detect cat ; dog", TaskPrompts.Detect(["cat", "dog"]));
        Assert.Equal("segment cat ; dog", TaskPrompts.Segment("cat;dog"));
        Assert.Equal("ocr", TaskPrompts.Ocr());
    }

    [Theory]
    [InlineData("")]
    [InlineData("   ")]
    [InlineData("cat ; ")]
    [InlineData("cat ;; dog")]
    [InlineData("cat\ndog")]
    [InlineData("<loc0001>")]
    public void Bad_object_names_are_rejected(string objects)
    {
        Assert.Throws<ArgumentException>(() => TaskPrompts.Detect(objects));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Segment(objects));
    }

    [Fact]
    public void Bad_lists_questions_and_languages_are_rejected()
    {
        Assert.Throws<ArgumentException>(() => TaskPrompts.Detect(Array.Empty<string>()));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Detect(["cat", ""]));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Detect(["cat ; dog"]));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Answer(""));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Answer("what\nis it"));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Caption(""));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Caption("en de"));
        Assert.Throws<ArgumentException>(() => TaskPrompts.Answer("why?", "e\nn"));
    }

    [Theory]
    [InlineData("caption en", PaliGemmaTask.Caption)]
    [InlineData("answer en why", PaliGemmaTask.Answer)]
    [InlineData("detect cat ; dog", PaliGemmaTask.Detect)]
    [InlineData("  segment cat", PaliGemmaTask.Segment)]
    [InlineData("ocr", PaliGemmaTask.Ocr)]
    [InlineData("describe the picture", PaliGemmaTask.Raw)]
    [InlineData("detection", PaliGemmaTask.Raw)]
    [InlineData("question en a cat", PaliGemmaTask.Raw)]   // question generation, not answering
    public void TaskOf_reads_the_first_word(string prompt, PaliGemmaTask task) => Assert.Equal(task, TaskPrompts.TaskOf(prompt));
}
